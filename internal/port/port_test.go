package port

import (
	"errors"
	"strconv"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want uint16
	}{
		{"1", 1},
		{"9", 9},
		{"10", 10},
		{"80", 80},
		{"6379", 6379},
		{"8600", 8600},
		{"65535", 65535},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := Parse(tc.in)
			if err != nil || got != tc.want {
				t.Fatalf("Parse(%q) = %d, %v; want %d, nil", tc.in, got, err, tc.want)
			}
		})
	}
}

func TestParseInvalid(t *testing.T) {
	for _, tc := range []struct {
		name, in, why string
	}{
		{"empty", "", "empty"},
		{"zero", "0", "out of range"},
		{"zeros", "00", "leading zero"},
		{"leading zero", "080", "leading zero"},
		{"leading zeros", "0080", "leading zero"},
		{"leading zero max", "065535", "leading zero"},
		{"above max", "65536", "out of range"},
		{"far above max", "99999", "out of range"},
		{"six digits", "100000", "out of range"},
		{"huge", "184467440737095516160", "out of range"},
		{"plus", "+80", "not a decimal number"},
		{"minus", "-1", "not a decimal number"},
		{"minus zero", "-0", "not a decimal number"},
		{"space before", " 80", "not a decimal number"},
		{"space after", "80 ", "not a decimal number"},
		{"newline", "80\n", "not a decimal number"},
		{"hex", "0x50", "not a decimal number"},
		{"underscore", "6_379", "not a decimal number"},
		{"name", "http", "not a decimal number"},
		{"float", "80.0", "not a decimal number"},
		{"exponent", "8e1", "not a decimal number"},
		{"arabic-indic digits", "٨٠", "not a decimal number"},
		{"fullwidth digits", "８０", "not a decimal number"},
		{"long junk", strings.Repeat("x", 100), "not a decimal number"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Parse(tc.in)
			if err == nil {
				t.Fatalf("Parse(%q) = %d, nil; want an error", tc.in, got)
			}
			if got != 0 {
				t.Errorf("Parse(%q) = %d with an error; want 0", tc.in, got)
			}
			if !errors.Is(err, ErrInvalid) {
				t.Errorf("errors.Is(%v, ErrInvalid) = false", err)
			}
			var pe *Error
			if !errors.As(err, &pe) || pe.Value != tc.in {
				t.Errorf("error %v is not an *Error with Value %q", err, tc.in)
			}
			msg := err.Error()
			if !strings.Contains(msg, tc.why) {
				t.Errorf("error %q does not say %q", msg, tc.why)
			}
			if tc.in != "" && !strings.Contains(msg, `"`+strings.ReplaceAll(tc.in, "\n", `\n`)+`"`) {
				t.Errorf("error %q does not name the value %q", msg, tc.in)
			}
			if !strings.Contains(msg, "1 to 65535") {
				t.Errorf("error %q does not say what a port is", msg)
			}
		})
	}
}

// TestParseAll checks Parse against the definition for every string of up
// to five digits: exactly the canonical decimal spellings of 1-65535 parse,
// each to its own number.
func TestParseAll(t *testing.T) {
	seen := make([]bool, 65536)
	var digits []byte
	var walk func()
	walk = func() {
		if len(digits) > 0 {
			s := string(digits)
			n, err := Parse(s)
			canonical := s[0] != '0' && atoi(s) >= 1 && atoi(s) <= 65535
			switch {
			case canonical && (err != nil || int(n) != atoi(s)):
				t.Fatalf("Parse(%q) = %d, %v; want %d, nil", s, n, err, atoi(s))
			case !canonical && err == nil:
				t.Fatalf("Parse(%q) = %d, nil; want an error", s, n)
			case canonical:
				if seen[n] {
					t.Fatalf("port %d has two spellings", n)
				}
				seen[n] = true
			}
		}
		if len(digits) == 5 {
			return
		}
		for c := byte('0'); c <= '9'; c++ {
			digits = append(digits, c)
			walk()
			digits = digits[:len(digits)-1]
		}
	}
	walk()
	for p := 1; p <= 65535; p++ {
		if !seen[p] {
			t.Fatalf("port %d has no spelling that parses", p)
		}
	}
}

func atoi(s string) int {
	n, err := strconv.Atoi(s)
	if err != nil {
		panic(err) // only called on digit strings
	}
	return n
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{"1", "80", "080", "65535", "65536", "+1", "", " 1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := Parse(s)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("Parse(%q) error %v is not ErrInvalid", s, err)
			}
			return
		}
		// One spelling per port: what parses is what formatting gives back.
		if n == 0 || strconv.Itoa(int(n)) != s {
			t.Fatalf("Parse(%q) = %d; its canonical spelling is %q", s, n, strconv.Itoa(int(n)))
		}
	})
}
