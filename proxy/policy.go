package proxy

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"syscall"
)

// The target policy: which addresses the proxy may dial on a container's
// behalf. connectable dials from the host's namespace as root, so without
// it a label (or a DNS answer) naming 127.0.0.1:8500 would reach the host's
// Consul agent, its admin endpoint, a Docker API on loopback or the cloud
// metadata service: places the container itself cannot reach.

// DefaultDenyTargets are the ranges refused unless AllowTargets opens them:
// loopback, link-local (cloud metadata lives at 169.254.169.254),
// unspecified (connecting to 0.0.0.0 or :: reaches the host's own
// listeners), multicast and broadcast. v4-mapped IPv6 addresses are checked
// as the IPv4 address they carry, so ::ffff:127.0.0.1 is loopback too.
var DefaultDenyTargets = []netip.Prefix{
	netip.MustParsePrefix("127.0.0.0/8"),
	netip.MustParsePrefix("::1/128"),
	netip.MustParsePrefix("169.254.0.0/16"),
	netip.MustParsePrefix("fe80::/10"),
	netip.MustParsePrefix("0.0.0.0/8"),
	netip.MustParsePrefix("::/128"),
	netip.MustParsePrefix("224.0.0.0/4"),
	netip.MustParsePrefix("ff00::/8"),
	netip.MustParsePrefix("255.255.255.255/32"),
}

// ErrTargetRefused is wrapped by the error of a dial the target policy
// refused; nothing was sent to the address.
var ErrTargetRefused = errors.New("refused by the target policy")

// targetPolicy decides on the addresses a dial may reach. The most specific
// prefix containing an address wins. On a tie the operator's ranges beat the
// defaults (--allow-targets 127.0.0.0/8 opens the default 127.0.0.0/8), and
// between the operator's own an allow and a deny, deny wins. An address no
// prefix contains is allowed: the host's LAN addresses (where Registrator
// registers published ports) and other hosts are reachable by default.
type targetPolicy struct {
	rules []policyRule
}

type policyRule struct {
	prefix netip.Prefix
	allow  bool
	rank   int    // breaks ties of prefix length: default 0, allow 1, deny 2
	source string // "default", "allow" or "deny": names the rule in errors
}

// newTargetPolicy builds the policy from the operator's ranges on top of
// DefaultDenyTargets.
func newTargetPolicy(allow, deny []netip.Prefix) *targetPolicy {
	p := &targetPolicy{}
	add := func(prefixes []netip.Prefix, ok bool, rank int, source string) {
		for _, pfx := range prefixes {
			p.rules = append(p.rules, policyRule{prefix: unmapPrefix(pfx), allow: ok, rank: rank, source: source})
		}
	}
	add(DefaultDenyTargets, false, 0, "default")
	add(allow, true, 1, "allow")
	add(deny, false, 2, "deny")
	return p
}

// check returns nil if a may be dialled, else an error wrapping
// ErrTargetRefused that names the rule.
func (p *targetPolicy) check(a netip.Addr) error {
	a = a.Unmap().WithZone("")
	var best *policyRule
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
	if best.source == "default" {
		return fmt.Errorf("%s: %w (%s is denied by default; --allow-targets opens it)", a, ErrTargetRefused, best.prefix)
	}
	return fmt.Errorf("%s: %w (--deny-targets %s)", a, ErrTargetRefused, best.prefix)
}

// control is a net.Dialer.Control hook: it checks the address the socket
// is about to connect to, after any resolution, so that what is checked is
// what is dialled.
func (p *targetPolicy) control(network, address string, _ syscall.RawConn) error {
	ap, err := netip.ParseAddrPort(address)
	if err != nil {
		return fmt.Errorf("dialling %s: %w (not an address)", address, ErrTargetRefused)
	}
	return p.check(ap.Addr())
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

// CheckTarget applies the server's target policy to a: nil if the relay
// may dial it, else why not. The socket data path writes only the
// endpoints it allows, so that one policy bounds both paths.
func (s *Server) CheckTarget(a netip.Addr) error {
	s.init()
	return s.policy.check(a)
}
