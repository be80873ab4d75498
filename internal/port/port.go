// Package port owns the one rule for spelling a TCP or UDP port in
// connectable's input: label keys (connect.<port>), label values
// (host:port, ip:port) and flags. A port is written in decimal, 1 to 65535,
// without sign, spaces or leading zeros, so that each port has exactly one
// spelling: connect.80 and connect.080 can never both name port 80, and a
// value is accepted by the resolver exactly when its port would be accepted
// as a label key.
//
// Typical usage:
//
//	p, err := port.Parse(s)
//	if err != nil {
//		return fmt.Errorf("label %s: %w", key, err) // port "080": leading zero (...)
//	}
package port

import (
	"errors"
	"fmt"
)

// ErrInvalid is the kind of every error Parse returns, for errors.Is.
var ErrInvalid = errors.New("invalid port")

// rule is what every error message ends with, so a reader knows the fix.
const rule = "a port is a decimal number from 1 to 65535, no sign, no leading zero"

// Error says why a string is not a port.
type Error struct {
	Value  string // the string given to Parse
	Reason string // what is wrong with it, e.g. "leading zero"
}

func (e *Error) Error() string {
	if e.Value == "" {
		return fmt.Sprintf("port: %s (%s)", e.Reason, rule)
	}
	return fmt.Sprintf("port %q: %s (%s)", e.Value, e.Reason, rule)
}

// Is reports whether target is ErrInvalid.
func (e *Error) Is(target error) bool { return target == ErrInvalid }

// Parse returns the port that s spells: a decimal number from 1 to 65535
// with no sign, no leading zero and nothing else around it. Otherwise the
// error is an *Error naming s and what is wrong with it, and errors.Is(err,
// ErrInvalid) holds.
func Parse(s string) (uint16, error) {
	bad := func(reason string) (uint16, error) { return 0, &Error{Value: s, Reason: reason} }
	if s == "" {
		return bad("empty")
	}
	if !isDigits(s) {
		return bad("not a decimal number")
	}
	if s == "0" {
		return bad("out of range 1-65535")
	}
	if s[0] == '0' {
		return bad("leading zero")
	}
	if len(s) > 5 {
		return bad("out of range 1-65535")
	}
	n := 0
	for i := 0; i < len(s); i++ {
		n = n*10 + int(s[i]-'0')
	}
	if n > 65535 {
		return bad("out of range 1-65535")
	}
	return uint16(n), nil
}

func isDigits(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}
