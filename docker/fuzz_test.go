package docker

import (
	"errors"
	"strconv"
	"strings"
	"testing"
)

// FuzzParseRoutes feeds ParseRoutes labels as Docker passes them through
// from any image or docker run: two connect-ish labels and one unrelated.
// No input may panic, and the result must keep ParseRoutes' promises: each
// route comes from a label spelled connect.<canonical port> with a
// non-blank value that validate accepts, every other connect.* label is
// named by exactly one error, and nothing else is reported.
func FuzzParseRoutes(f *testing.F) {
	for _, s := range [][4]string{
		{"connect.6000", "redis.service.consul", "connect.6001", "web.service.consul"},
		{"connect.6000", "redis.service.consul", "connect.06000", "dup"},
		{"connect.abc", "x", "connect.70000", "y"},
		{"connect.0", "x", "connect.65535", "z"},
		{"connect.65536", "x", "connect.-1", "y"},
		{"connect.+80", "x", "connect. 80", "y"},
		{"connect.80", "", "connect.81", " \t\n"},
		{"connect.80", "not a name", "connect.81", "bad!name"},
		{"connect.", "x", "connect", "y"},
		{"connect.80.1", "x", "connect.1e3", "y"},
		{"connect.99999999999999999999", "x", "connect.٣", "y"},
		{"connect.443", "10.0.0.1:443", "connect.444", "[::1]:444"},
		{"CONNECT.80", "x", "connect.80", "\x00"},
	} {
		f.Add(s[0], s[1], s[2], s[3])
	}
	noBang := func(v string) error {
		if strings.ContainsAny(v, "! ") {
			return errors.New("bad character")
		}
		return nil
	}
	f.Fuzz(func(t *testing.T, k1, v1, k2, v2 string) {
		labels := map[string]string{k1: v1, k2: v2, "com.example.unrelated": v1}
		for _, validate := range []func(string) error{nil, noBang} {
			routes, errs := ParseRoutes(labels, validate)
			if routes != nil && len(routes) == 0 {
				t.Fatalf("empty non-nil routes for %q", labels)
			}
			named := map[string]int{}
			for _, err := range errs {
				var le *LabelError
				if !errors.As(err, &le) {
					t.Fatalf("error %v is not a *LabelError", err)
				}
				if labels[le.Label] != le.Value || !strings.HasPrefix(le.Label, LabelPrefix) {
					t.Fatalf("error names label %q=%q, not one of %q", le.Label, le.Value, labels)
				}
				named[le.Label]++
			}
			for port, service := range routes {
				key := LabelPrefix + strconv.Itoa(int(port))
				if port == 0 || labels[key] != service || strings.TrimSpace(service) == "" {
					t.Fatalf("route %d → %q does not come from a valid label of %q", port, service, labels)
				}
				if validate != nil && validate(service) != nil {
					t.Fatalf("route %d → %q passed a value validate rejects", port, service)
				}
				if named[key] > 0 {
					t.Fatalf("label %s is both a route and an error", key)
				}
			}
			for key := range labels {
				if !strings.HasPrefix(key, LabelPrefix) {
					if named[key] > 0 {
						t.Fatalf("unrelated label %q reported", key)
					}
					continue
				}
				p, err := strconv.ParseUint(strings.TrimPrefix(key, LabelPrefix), 10, 16)
				svc, ok := routes[uint16(p)]
				isRoute := err == nil && ok && svc == labels[key] && LabelPrefix+strconv.Itoa(int(p)) == key
				if isRoute == (named[key] == 1) || named[key] > 1 {
					t.Fatalf("label %q: route %v, named by %d errors", key, isRoute, named[key])
				}
			}
		}
	})
}
