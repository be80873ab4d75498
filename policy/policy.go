// Package policy owns the target policy: which endpoint addresses
// connectable may send a container's connection to. The relay dials from
// the host's namespace as root and the socket path rewrites connects to
// whatever a table holds, so without it a label (or a DNS answer) naming
// 127.0.0.1:8500 would reach the host's Consul agent, its admin endpoint,
// a Docker API on loopback or the cloud metadata service: places the
// container itself cannot reach. Both data paths ask the same Policy.
//
// Typical usage:
//
//	p := policy.New(allow, deny)
//	if err := p.Check(addr); err != nil { // wraps policy.ErrRefused
//		...
//	}
//	d := net.Dialer{Control: p.Control} // checks what is dialled
package policy

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"syscall"
)

// DefaultDeny are the ranges refused unless an allow opens them: loopback,
// link-local (cloud metadata lives at 169.254.169.254), the cloud metadata
// addresses outside it (AWS's IPv6 fd00:ec2::254, Alibaba's
// 100.100.100.200), unspecified (connecting to 0.0.0.0 or :: reaches the
// host's own listeners), multicast and broadcast.
//
// An IPv6 address that carries an IPv4 address is refused when that IPv4
// address is: v4-mapped (::ffff:0:0/96), IPv4-compatible (::/96), NAT64
// (64:ff9b::/96 and 64:ff9b:1::/48, RFC 6052 and 8215) and 6to4
// (2002::/16). A NAT64 gateway or a 6to4 relay would otherwise take
// 64:ff9b::7f00:1 to the host's loopback, or 2002:a9fe:a9fe:: to the
// metadata service.
var DefaultDeny = []netip.Prefix{
	netip.MustParsePrefix("127.0.0.0/8"),
	netip.MustParsePrefix("::1/128"),
	netip.MustParsePrefix("169.254.0.0/16"),
	netip.MustParsePrefix("fe80::/10"),
	netip.MustParsePrefix("fd00:ec2::254/128"),
	netip.MustParsePrefix("100.100.100.200/32"),
	netip.MustParsePrefix("0.0.0.0/8"),
	netip.MustParsePrefix("::/128"),
	netip.MustParsePrefix("224.0.0.0/4"),
	netip.MustParsePrefix("ff00::/8"),
	netip.MustParsePrefix("255.255.255.255/32"),
}

// ErrRefused is wrapped by the error of an address the policy refused;
// nothing may be sent to it.
var ErrRefused = errors.New("refused by the target policy")

// Policy decides on the addresses a connection may reach. The most
// specific prefix containing an address wins. On a tie the operator's
// ranges beat the defaults (allow 127.0.0.0/8 opens the default
// 127.0.0.0/8), and between the operator's own an allow and a deny, deny
// wins. An address no prefix contains is allowed: the host's LAN addresses
// (where Registrator registers published ports) and other hosts are
// reachable by default. A Policy is immutable and safe for concurrent use.
type Policy struct {
	rules []rule
}

type rule struct {
	prefix netip.Prefix
	allow  bool
	rank   int    // breaks ties of prefix length: default 0, allow 1, deny 2
	source string // "default", "allow" or "deny": names the rule in errors
}

// New builds the policy from the operator's ranges on top of DefaultDeny.
func New(allow, deny []netip.Prefix) *Policy {
	p := &Policy{}
	add := func(prefixes []netip.Prefix, ok bool, rank int, source string) {
		for _, pfx := range prefixes {
			p.rules = append(p.rules, rule{prefix: unmapPrefix(pfx), allow: ok, rank: rank, source: source})
		}
	}
	add(DefaultDeny, false, 0, "default")
	add(allow, true, 1, "allow")
	add(deny, false, 2, "deny")
	return p
}

// Check returns nil if a may be connected to, else an error wrapping
// ErrRefused that names the rule. An IPv6 address that embeds an IPv4
// address (see DefaultDeny) is refused if either is.
func (p *Policy) Check(a netip.Addr) error {
	a = a.Unmap().WithZone("")
	if err := p.check(a, a); err != nil {
		return err
	}
	for _, v4 := range embedded(a) {
		if err := p.check(v4, a); err != nil {
			return err
		}
	}
	return nil
}

// check decides on a alone; orig is what the caller asked about, named in
// the error.
func (p *Policy) check(a, orig netip.Addr) error {
	var best *rule
	for i := range p.rules {
		r := &p.rules[i]
		if !r.prefix.Contains(a) {
			continue
		}
		if best == nil || r.prefix.Bits() > best.prefix.Bits() ||
			(r.prefix.Bits() == best.prefix.Bits() && r.rank > best.rank) {
			best = r
		}
	}
	if best == nil || best.allow {
		return nil
	}
	via := ""
	if a != orig {
		via = fmt.Sprintf("it carries %s: ", a)
	}
	if best.source == "default" {
		return fmt.Errorf("%s: %w (%s%s is denied by default; --allow-targets opens it)", orig, ErrRefused, via, best.prefix)
	}
	return fmt.Errorf("%s: %w (%s--deny-targets %s)", orig, ErrRefused, via, best.prefix)
}

var (
	nat64WellKnown = netip.MustParsePrefix("64:ff9b::/96")
	nat64Local     = netip.MustParsePrefix("64:ff9b:1::/48")
	sixToFour      = netip.MustParsePrefix("2002::/16")
	v4Compatible   = netip.MustParsePrefix("::/96")
	thisNetwork    = netip.MustParsePrefix("0.0.0.0/8")
)

// embedded returns the IPv4 addresses an IPv6 address may carry to a
// translator or a tunnel. The local-use NAT64 prefix may be cut at any
// length RFC 6052 allows within it, so each of those positions counts.
func embedded(a netip.Addr) []netip.Addr {
	if !a.Is6() {
		return nil
	}
	b := a.As16()
	v4 := func(i, j, k, l int) netip.Addr { return netip.AddrFrom4([4]byte{b[i], b[j], b[k], b[l]}) }
	switch {
	case nat64WellKnown.Contains(a), v4Compatible.Contains(a):
		return []netip.Addr{v4(12, 13, 14, 15)}
	case nat64Local.Contains(a):
		// RFC 6052 section 2.2: /48, /56 and /64 skip bits 64-71 (u).
		// The zeros around an address at the other positions read as
		// 0.0.0.0/8, which no translator forwards, so they are no
		// evidence.
		out := []netip.Addr{v4(12, 13, 14, 15)}
		for _, e := range []netip.Addr{v4(6, 7, 9, 10), v4(7, 9, 10, 11), v4(9, 10, 11, 12)} {
			if !thisNetwork.Contains(e) {
				out = append(out, e)
			}
		}
		return out
	case sixToFour.Contains(a):
		return []netip.Addr{v4(2, 3, 4, 5)}
	}
	return nil
}

// Control is a net.Dialer.Control hook: it checks the address the socket
// is about to connect to, after any resolution, so that what is checked is
// what is dialled.
func (p *Policy) Control(network, address string, _ syscall.RawConn) error {
	ap, err := netip.ParseAddrPort(address)
	if err != nil {
		return fmt.Errorf("dialling %s: %w (not an address)", address, ErrRefused)
	}
	return p.Check(ap.Addr())
}

// unmapPrefix turns a prefix of v4-mapped IPv6 addresses into the IPv4
// prefix it covers, since addresses are checked unmapped.
func unmapPrefix(p netip.Prefix) netip.Prefix {
	a := p.Addr()
	if a.Is4In6() && p.Bits() >= 96 {
		return netip.PrefixFrom(a.Unmap(), p.Bits()-96).Masked()
	}
	return p.Masked()
}

// ParsePrefixes parses a comma-separated list of CIDR prefixes (a bare
// address is its own /32 or /128), for --allow-targets and --deny-targets.
// The error names the value that is not a prefix.
func ParsePrefixes(s string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for f := range strings.SplitSeq(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		if !strings.Contains(f, "/") {
			a, err := netip.ParseAddr(f)
			if err != nil {
				return nil, fmt.Errorf("%q is not a CIDR prefix (e.g. 10.0.0.0/8, fd00::/8) nor an address", f)
			}
			out = append(out, netip.PrefixFrom(a, a.BitLen()))
			continue
		}
		p, err := netip.ParsePrefix(f)
		if err != nil {
			return nil, fmt.Errorf("%q is not a CIDR prefix (e.g. 10.0.0.0/8, fd00::/8)", f)
		}
		out = append(out, p)
	}
	return out, nil
}
