package resolver

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

func TestValidate(t *testing.T) {
	long63 := strings.Repeat("a", 63)
	for _, tc := range []struct {
		value string
		kind  valueKind
		want  string // for valid values: the name or address parsed
	}{
		{"redis.service.consul", kindSRV, "redis.service.consul."},
		{"_redis._tcp.service.consul", kindSRV, "_redis._tcp.service.consul."},
		{"Redis.Service.Consul.", kindSRV, "redis.service.consul."},
		{"redis", kindSRV, "redis."},
		{"a-b.c1.d_e", kindSRV, "a-b.c1.d_e."},
		{long63 + ".test", kindSRV, long63 + ".test."},
		{"db.example.com:5432", kindHostPort, "db.example.com."},
		{"db:1", kindHostPort, "db."},
		{"db.example.com.:65535", kindHostPort, "db.example.com."},
		{"10.0.0.1:6379", kindAddrPort, "10.0.0.1:6379"},
		{"[fd00::1]:6379", kindAddrPort, "[fd00::1]:6379"},
		{"[::ffff:10.0.0.1]:80", kindAddrPort, "[::ffff:10.0.0.1]:80"},
	} {
		t.Run(tc.value, func(t *testing.T) {
			if err := Validate(tc.value); err != nil {
				t.Fatalf("Validate(%q) = %v; want nil", tc.value, err)
			}
			v, _ := parseValue(tc.value)
			got := v.name
			if v.kind == kindAddrPort {
				got = v.addr.String()
			}
			if v.kind != tc.kind || got != tc.want {
				t.Fatalf("parseValue(%q) = kind %d %q; want kind %d %q", tc.value, v.kind, got, tc.kind, tc.want)
			}
		})
	}

	for _, tc := range []struct {
		value string
		why   string
	}{
		{"", "empty"},
		{" redis.service.consul", "space"},
		{"redis.service.consul\n", "space"},
		{".", "empty name"},
		{"..", "empty label"},
		{"redis..consul", "empty label"},
		{".redis.consul", "empty label"},
		{"redis.service.consul..", "empty label"},
		{strings.Repeat("a", 64) + ".test", "longer than 63"},
		{strings.Repeat("abcdefghi.", 26) + "test", "longer than 253"},
		{"-redis.consul", "starts or ends with '-'"},
		{"redis-.consul", "starts or ends with '-'"},
		{"red is.consul", "not allowed"},
		{"redis/tcp.consul", "not allowed"},
		{"rédis.consul", "not allowed"},
		{"redis.consul:", "missing port"},
		{"redis.consul:0", "out of range"},
		{"redis.consul:65536", "out of range"},
		{"redis.consul:-1", "not a decimal number"},
		{"redis.consul:+80", "not a decimal number"},
		{"redis.consul:http", "not a decimal number"},
		{"redis.consul:80:90", "not host:port"},
		{":80", "empty name"},
		{"bad..host:80", "empty label"},
		{"10.0.0.1", "needs a port"},
		{"fd00::1", "[ip6]:port"},
		{"fd00::1:80", "[ip6]:port"},
		{"[fd00::1]", "not host:port"},
		{"[redis.consul]:80", "not an IPv6 address"},
		{"[fe80::1%eth0]:80", "zone"},
		{"0.0.0.0:80", "unspecified"},
		{"[::]:80", "unspecified"},
		{"10.0.0.1:0", "out of range"},
		{"10.0.0.1:99999", "out of range"},
		// The rule of internal/port, the same as for connect.<port> keys.
		{"10.0.0.1:080", `port "080": leading zero`},
		{"[fd00::1]:0443", `port "0443": leading zero`},
		{"redis.consul:00", "leading zero"},
		{"redis.consul: 80", "not a decimal number"},
		{"redis.consul:６３７９", "not a decimal number"},
	} {
		t.Run(tc.value, func(t *testing.T) {
			err := Validate(tc.value)
			if err == nil {
				t.Fatalf("Validate(%q) = nil; want an error", tc.value)
			}
			if !errors.Is(err, ErrInvalidValue) {
				t.Errorf("Validate(%q) = %v; want ErrInvalidValue", tc.value, err)
			}
			if msg := err.Error(); !strings.Contains(msg, tc.why) || !strings.Contains(msg, strings.TrimSpace(tc.value)) {
				t.Errorf("Validate(%q) = %q; want it to name the value and say %q", tc.value, msg, tc.why)
			}
		})
	}
}

func TestParseServers(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []string
	}{
		{"", nil},
		{"  ", nil},
		{"127.0.0.1", []string{"127.0.0.1:53"}},
		{"127.0.0.1:8600", []string{"127.0.0.1:8600"}},
		{"::1", []string{"[::1]:53"}},
		{"[::1]", []string{"[::1]:53"}},
		{"[::1]:8600", []string{"[::1]:8600"}},
		{"[fe80::1%eth0]:53", []string{"[fe80::1%eth0]:53"}},
		{"10.0.0.2, 10.0.0.3:5353 ,fd00::53", []string{"10.0.0.2:53", "10.0.0.3:5353", "[fd00::53]:53"}},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseServers(tc.in)
			if err != nil || !slices.Equal(got, tc.want) {
				t.Fatalf("ParseServers(%q) = %v, %v; want %v", tc.in, got, err, tc.want)
			}
			for _, s := range got {
				if _, err := netip.ParseAddrPort(s); err != nil {
					t.Errorf("ParseServers(%q) returned %q, not ip:port: %v", tc.in, s, err)
				}
			}
		})
	}

	for _, tc := range []struct {
		in, bad, why string
	}{
		{"127.0.0.1,", "", "empty item"},
		{",127.0.0.1", "", "empty item"},
		{"127.0.0.1,,127.0.0.2", "", "empty item"},
		{"dns.example.com", "dns.example.com", "not an IP address"},
		{"dns.example.com:53", "dns.example.com:53", "not an IP address"},
		{"127.0.0.1:", "127.0.0.1:", "missing port"},
		{"127.0.0.1:0", "127.0.0.1:0", "out of range"},
		{"127.0.0.1:65536", "127.0.0.1:65536", "out of range"},
		{"127.0.0.1:dns", "127.0.0.1:dns", "not a decimal number"},
		{"127.0.0.1:53:53", "127.0.0.1:53:53", "not an IP address"},
		{"[127.0.0.1]", "[127.0.0.1]", "brackets"},
		{"[::1", "[::1", "not an IP address"},
		{"::1]", "::1]", "not an IP address"},
		{"fd00::1:53:x", "fd00::1:53:x", "not an IP address"},
		{"[::1]:x", "[::1]:x", "not a decimal number"},
		{"127.0.0.1:08600", "127.0.0.1:08600", `port "08600": leading zero`},
		{"256.0.0.1", "256.0.0.1", "not an IP address"},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseServers(tc.in)
			if err == nil {
				t.Fatalf("ParseServers(%q) = %v; want an error", tc.in, got)
			}
			if msg := err.Error(); !strings.Contains(msg, `"`+tc.bad+`"`) || !strings.Contains(msg, tc.why) {
				t.Errorf("ParseServers(%q) = %q; want it to name %q and say %q", tc.in, msg, tc.bad, tc.why)
			}
		})
	}
}
