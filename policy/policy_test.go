package policy

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
)

func TestCheck(t *testing.T) {
	pfx := func(s ...string) []netip.Prefix {
		var out []netip.Prefix
		for _, p := range s {
			out = append(out, netip.MustParsePrefix(p))
		}
		return out
	}
	cases := []struct {
		name        string
		allow, deny []netip.Prefix
		addr        string
		refused     bool
	}{
		{"loopback", nil, nil, "127.0.0.1", true},
		{"loopback elsewhere in 127/8", nil, nil, "127.5.6.7", true},
		{"v6 loopback", nil, nil, "::1", true},
		{"v4-mapped loopback", nil, nil, "::ffff:127.0.0.1", true},
		{"metadata", nil, nil, "169.254.169.254", true},
		{"v4-mapped metadata", nil, nil, "::ffff:169.254.169.254", true},
		{"AWS v6 metadata", nil, nil, "fd00:ec2::254", true},
		{"next to AWS v6 metadata", nil, nil, "fd00:ec2::253", false},
		{"Alibaba metadata", nil, nil, "100.100.100.200", true},
		{"next to Alibaba metadata", nil, nil, "100.100.100.201", false},
		{"v6 link-local", nil, nil, "fe80::1", true},
		{"v6 link-local with zone", nil, nil, "fe80::1%eth0", true},
		{"unspecified", nil, nil, "0.0.0.0", true},
		{"v6 unspecified", nil, nil, "::", true},
		{"multicast", nil, nil, "239.1.2.3", true},
		{"v6 multicast", nil, nil, "ff02::1", true},
		{"broadcast", nil, nil, "255.255.255.255", true},
		{"LAN", nil, nil, "192.168.1.10", false},
		{"bridge", nil, nil, "172.17.0.2", false},
		{"public v6", nil, nil, "2001:db8::1", false},

		{"NAT64 loopback", nil, nil, "64:ff9b::7f00:1", true},
		{"NAT64 metadata", nil, nil, "64:ff9b::a9fe:a9fe", true},
		{"NAT64 Alibaba metadata", nil, nil, "64:ff9b::6464:64c8", true},
		{"NAT64 public", nil, nil, "64:ff9b::c000:201", false},
		{"local NAT64 /96 loopback", nil, nil, "64:ff9b:1::7f00:1", true},
		{"local NAT64 /48 loopback", nil, nil, "64:ff9b:1:7f00:0:100::", true},
		{"local NAT64 /56 metadata", nil, nil, "64:ff9b:1:a9:fe:a9fe::", true},
		{"local NAT64 /64 loopback", nil, nil, "64:ff9b:1:0:7f:0:100::", true},
		{"local NAT64 public", nil, nil, "64:ff9b:1::c000:201", false},
		{"6to4 loopback", nil, nil, "2002:7f00:1::1", true},
		{"6to4 metadata", nil, nil, "2002:a9fe:a9fe::", true},
		{"6to4 public", nil, nil, "2002:c000:201::1", false},
		{"IPv4-compatible loopback", nil, nil, "::127.0.0.1", true},
		{"IPv4-compatible metadata", nil, nil, "::169.254.169.254", true},
		{"IPv4-compatible public", nil, nil, "::192.0.2.1", false},
		{"NAT64 of an operator's deny", nil, pfx("10.0.0.0/8"), "64:ff9b::a00:1", true},
		{"NAT64 loopback, v4 allowed", pfx("127.0.0.0/8"), nil, "64:ff9b::7f00:1", false},
		{"6to4 range denied itself", nil, pfx("2002::/16"), "2002:c000:201::1", true},

		{"allowed loopback", pfx("127.0.0.0/8"), nil, "127.0.0.1", false},
		{"allowed loopback, mapped", pfx("127.0.0.0/8"), nil, "::ffff:127.0.0.1", false},
		{"allow given mapped", pfx("::ffff:127.0.0.0/104"), nil, "127.0.0.1", false},
		{"allow narrower than default", pfx("127.0.0.1/32"), nil, "127.0.0.2", true},
		{"deny more specific than allow", pfx("127.0.0.0/8"), pfx("127.0.0.2/32"), "127.0.0.2", true},
		{"allow more specific than deny", pfx("127.0.0.1/32"), pfx("127.0.0.0/8"), "127.0.0.1", false},
		{"tie: deny wins", pfx("10.0.0.0/8"), pfx("10.0.0.0/8"), "10.1.2.3", true},
		{"denied bridge", nil, pfx("172.17.0.0/16"), "172.17.0.2", true},
		{"other bridge", nil, pfx("172.17.0.0/16"), "172.18.0.2", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := New(tc.allow, tc.deny).Check(netip.MustParseAddr(tc.addr))
			if got := errors.Is(err, ErrRefused); got != tc.refused {
				t.Errorf("Check(%s): got %v; want refused %v", tc.addr, err, tc.refused)
			}
		})
	}
}

// TestCheckNamesEmbedded: the refusal of a translated form names the IPv4
// address and the rule that refused it.
func TestCheckNamesEmbedded(t *testing.T) {
	err := New(nil, nil).Check(netip.MustParseAddr("64:ff9b::7f00:1"))
	if err == nil || !strings.Contains(err.Error(), "127.0.0.1") || !strings.Contains(err.Error(), "127.0.0.0/8") {
		t.Errorf("Check(64:ff9b::7f00:1) = %v; want it to name 127.0.0.1 and 127.0.0.0/8", err)
	}
}

func TestControl(t *testing.T) {
	p := New(nil, nil)
	for addr, refused := range map[string]bool{"127.0.0.1:80": true, "[64:ff9b::7f00:1]:80": true, "192.0.2.1:80": false, "nope": true} {
		if err := p.Control("tcp", addr, nil); errors.Is(err, ErrRefused) != refused {
			t.Errorf("Control(%s) = %v; want refused %v", addr, err, refused)
		}
	}
}

func TestParsePrefixes(t *testing.T) {
	got, err := ParsePrefixes(" 10.0.0.0/8, fd00::/8,192.0.2.1 ,")
	if err != nil || len(got) != 3 || got[2] != netip.MustParsePrefix("192.0.2.1/32") {
		t.Errorf("got %v, %v; want 3 prefixes, the last 192.0.2.1/32", got, err)
	}
	for _, bad := range []string{"10.0.0.0/33", "nope", "10.0.0.0/8,x/8"} {
		if _, err := ParsePrefixes(bad); err == nil || !strings.Contains(err.Error(), "not a CIDR prefix") {
			t.Errorf("ParsePrefixes(%q): %v; want an error naming the bad value", bad, err)
		}
	}
}
