package docker

import (
	"errors"
	"maps"
	"slices"
	"testing"

	"github.com/connectable/connectable/internal/port"
)

func TestParseRoutes(t *testing.T) {
	noBang := func(v string) error {
		if slices.Contains([]byte(v), '!') {
			return errors.New("bad character")
		}
		return nil
	}
	tests := []struct {
		name     string
		labels   map[string]string
		validate func(string) error
		want     map[uint16]string
		wantErrs []string // labels named by the errors, in order
	}{
		{name: "none", labels: nil, want: nil},
		{name: "unrelated labels", labels: map[string]string{"com.example": "x", "connectable.test": "1", "connect": "y"}, want: nil},
		{name: "one", labels: map[string]string{"connect.6000": "redis.service.consul"}, want: map[uint16]string{6000: "redis.service.consul"}},
		{name: "bounds", labels: map[string]string{"connect.1": "a", "connect.65535": "b"}, want: map[uint16]string{1: "a", 65535: "b"}},
		{name: "several with unrelated", labels: map[string]string{"connect.80": "web", "connect.5432": "db", "maintainer": "me"}, want: map[uint16]string{80: "web", 5432: "db"}},
		{name: "not a number", labels: map[string]string{"connect.abc": "x", "connect.6000": "ok"}, want: map[uint16]string{6000: "ok"}, wantErrs: []string{"connect.abc"}},
		{name: "zero", labels: map[string]string{"connect.0": "x"}, wantErrs: []string{"connect.0"}},
		{name: "too large", labels: map[string]string{"connect.65536": "x", "connect.70000": "y"}, wantErrs: []string{"connect.65536", "connect.70000"}},
		{name: "negative", labels: map[string]string{"connect.-1": "x"}, wantErrs: []string{"connect.-1"}},
		{name: "plus sign", labels: map[string]string{"connect.+80": "x"}, wantErrs: []string{"connect.+80"}},
		{name: "leading zero", labels: map[string]string{"connect.080": "x", "connect.80": "y"}, want: map[uint16]string{80: "y"}, wantErrs: []string{"connect.080"}},
		{name: "no port", labels: map[string]string{"connect.": "x"}, wantErrs: []string{"connect."}},
		{name: "space in port", labels: map[string]string{"connect. 80": "x"}, wantErrs: []string{"connect. 80"}},
		{name: "empty value", labels: map[string]string{"connect.6000": ""}, wantErrs: []string{"connect.6000"}},
		{name: "blank value", labels: map[string]string{"connect.6000": "  "}, wantErrs: []string{"connect.6000"}},
		{name: "invalid value", labels: map[string]string{"connect.6000": "a!b", "connect.6001": "ab"}, validate: noBang, want: map[uint16]string{6001: "ab"}, wantErrs: []string{"connect.6000"}},
		{name: "validate not called when nil", labels: map[string]string{"connect.6000": "a!b"}, want: map[uint16]string{6000: "a!b"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, errs := ParseRoutes(tt.labels, tt.validate)
			if !maps.Equal(got, tt.want) || (got == nil) != (tt.want == nil) {
				t.Errorf("routes = %v; want %v", got, tt.want)
			}
			var gotErrs []string
			for _, err := range errs {
				var le *LabelError
				if !errors.As(err, &le) {
					t.Fatalf("error %v is not a *LabelError", err)
				}
				if le.Value != tt.labels[le.Label] {
					t.Errorf("error %v: value %q; want %q", err, le.Value, tt.labels[le.Label])
				}
				gotErrs = append(gotErrs, le.Label)
			}
			if !slices.Equal(gotErrs, tt.wantErrs) {
				t.Errorf("errors name %q; want %q (errors: %v)", gotErrs, tt.wantErrs, errs)
			}
		})
	}
}

func TestLabelErrorMessage(t *testing.T) {
	_, errs := ParseRoutes(map[string]string{"connect.70000": "redis"}, nil)
	if len(errs) != 1 {
		t.Fatalf("got %d errors; want 1", len(errs))
	}
	want := `label connect.70000="redis": port "70000": out of range 1-65535 (a port is a decimal number from 1 to 65535, no sign, no leading zero)`
	if got := errs[0].Error(); got != want {
		t.Errorf("Error() = %q; want %q", got, want)
	}
	if !errors.Is(errs[0], port.ErrInvalid) {
		t.Errorf("errors.Is(%v, port.ErrInvalid) = false", errs[0])
	}
}
