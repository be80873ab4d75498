package resolver

import (
	"errors"
	"fmt"
	"strings"
)

// Kinds of failure. Every error that Lookup returns for a DNS reason is (or
// wraps) an *Error whose Kind is one of these, so callers branch with
// errors.Is(err, resolver.ErrNoSuchName) and so on.
var (
	// ErrInvalidValue: the label value is not a DNS name, host:port or ip:port.
	ErrInvalidValue = errors.New("invalid value")
	// ErrNoSuchName: a server answered NXDOMAIN. This is authoritative: no
	// further server is asked.
	ErrNoSuchName = errors.New("no such name (NXDOMAIN)")
	// ErrNoEndpoints: the name exists but yields no usable endpoint (no SRV
	// records, only port-0 or "." targets, or targets without addresses).
	ErrNoEndpoints = errors.New("no endpoints")
	// ErrTimeout: a server did not answer in time.
	ErrTimeout = errors.New("timeout")
	// ErrRefused: a server answered REFUSED or refused the connection.
	// errors.Is(err, ErrServerFailure) is true for it as well.
	ErrRefused = errors.New("refused")
	// ErrServerFailure: a server answered SERVFAIL (or another error code),
	// or could not be reached.
	ErrServerFailure = errors.New("server failure")
	// ErrMalformed: a reply could not be parsed or does not answer the
	// question that was asked.
	ErrMalformed = errors.New("malformed reply")
)

// Error describes a failed lookup, or one failed DNS exchange.
type Error struct {
	Kind   error  // one of the Err* values above
	Name   string // the value looked up or the DNS name queried
	Type   string // the query type ("SRV", "A", "AAAA"), if about one query
	Server string // "ip:port" of the server, if about one server
	Err    error  // the cause, if any (for several servers: each one's *Error)
}

func (e *Error) Error() string {
	if e.Kind == ErrInvalidValue {
		if e.Err != nil {
			return fmt.Sprintf("invalid value %q: %v", e.Name, e.Err)
		}
		return fmt.Sprintf("invalid value %q", e.Name)
	}
	var b strings.Builder
	b.WriteString("resolving ")
	b.WriteString(e.Name)
	if e.Type != "" {
		b.WriteByte(' ')
		b.WriteString(e.Type)
	}
	if e.Server != "" {
		b.WriteString(" at ")
		b.WriteString(e.Server)
	}
	b.WriteString(": ")
	e.writeCause(&b)
	return b.String()
}

// writeCause writes what went wrong: the kind, then the underlying error.
func (e *Error) writeCause(b *strings.Builder) {
	b.WriteString(e.Kind.Error())
	if e.Err != nil {
		b.WriteString(": ")
		b.WriteString(e.Err.Error())
	}
}

// Is reports whether target is e's kind. A refusal is also a server failure.
func (e *Error) Is(target error) bool {
	return target == e.Kind || (e.Kind == ErrRefused && target == ErrServerFailure)
}

// Unwrap returns the cause, so errors.Is and errors.As see through to, for
// example, a per-server *Error or a net.Error.
func (e *Error) Unwrap() error { return e.Err }

// attemptErrors holds the failures of each server tried for one query, so a
// caller can see why each one failed; errors.Is and errors.As search all.
type attemptErrors []*Error

func (a attemptErrors) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "all %d servers failed: ", len(a))
	for i, e := range a {
		if i > 0 {
			b.WriteString("; ")
		}
		b.WriteString(e.Server)
		b.WriteString(": ")
		e.writeCause(&b)
	}
	return b.String()
}

func (a attemptErrors) Unwrap() []error {
	out := make([]error, len(a))
	for i, e := range a {
		out[i] = e
	}
	return out
}

// allFailed summarises the failures of every server tried for one query.
func allFailed(name, qtype string, attempts attemptErrors) error {
	if len(attempts) == 1 {
		return attempts[0]
	}
	kind := attempts[0].Kind
	for _, a := range attempts[1:] {
		if a.Kind != kind {
			kind = ErrServerFailure
			break
		}
	}
	return &Error{Kind: kind, Name: name, Type: qtype, Err: attempts}
}

// isAnswer reports whether err is a definitive answer about a name (it does
// not exist, or has nothing to offer) rather than a failure to get one.
func isAnswer(err error) bool {
	var e *Error
	return errors.As(err, &e) && (e.Kind == ErrNoSuchName || e.Kind == ErrNoEndpoints)
}
