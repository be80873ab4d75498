package sockpath

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/connectable/connectable/netns"
	"github.com/connectable/connectable/resolver"
)

// decision is how one port of one family is to be served.
type decision struct {
	service    string
	cands      []candidate // nil: by the relay
	reason     string
	unresolved bool
	expires    time.Time // of the answer decided on
	answer     string    // its signature
}

// converge computes sp's decisions and installs them. Called with sp.mu.
func (p *Path) converge(ctx context.Context, sp *space) error {
	ds, err := p.decide(ctx, sp)
	if err != nil {
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if sp.gone {
		return nil
	}
	changed := p.install(sp, ds)
	relayed, unresolved := false, false
	for _, st := range sp.ports {
		relayed = relayed || st.table == nil
		unresolved = unresolved || st.unresolved
	}
	now := time.Now()
	switch {
	case !relayed:
		sp.recheck, sp.recheckEvery = time.Time{}, 0
	case unresolved && (changed || sp.recheckEvery == 0):
		// A service that does not resolve yet is usually one about to
		// register: ask soon, then back off, so that labels naming
		// nothing cost the DNS server little.
		sp.recheckEvery = time.Second
		sp.recheck = now.Add(sp.recheckEvery)
	case changed || sp.recheckEvery == 0:
		sp.recheckEvery = recheckMin
		sp.recheck = now.Add(sp.recheckEvery)
	case !now.Before(sp.recheck):
		sp.recheckEvery = min(2*sp.recheckEvery, recheckMax)
		sp.recheck = now.Add(sp.recheckEvery)
	default:
		// Decided early (an engine event, a new answer): the back-off
		// keeps its schedule.
	}
	return nil
}

// nsView is what the namespace itself says: its addresses, and which
// endpoints it has a route to.
type nsView struct {
	prefixes []netip.Prefix
	routable map[netip.Addr]bool
}

// decide resolves sp's services and decides, for each port and family,
// whether the socket path serves it and from which endpoints.
func (p *Path) decide(ctx context.Context, sp *space) (map[routeKey]decision, error) {
	type resolved struct {
		ans    resolver.Answer
		err    error
		direct map[netip.AddrPort][]Direct
	}
	answers := map[string]*resolved{}
	var addrs []netip.Addr
	for i, port := range slices.Sorted(maps.Keys(sp.routes)) {
		svc := sp.routes[port]
		if answers[svc] != nil {
			continue
		}
		if i >= maxPortsPerNamespace {
			answers[svc] = &resolved{err: errors.New("not resolved")}
			continue
		}
		r := &resolved{direct: map[netip.AddrPort][]Direct{}}
		answers[svc] = r
		r.ans, r.err = p.cfg.Resolver.Answer(ctx, svc)
		if r.err != nil {
			continue
		}
		for _, g := range r.ans.Groups {
			for _, t := range g.Targets {
				for _, ep := range t.Endpoints {
					addrs = append(addrs, ep.Addr())
					if p.cfg.Ports == nil {
						continue
					}
					ds, err := p.cfg.Ports.Direct(ctx, ep)
					if err != nil {
						p.log.Warn("reading the engine's published ports", "err", err)
						continue
					}
					r.direct[ep] = ds
					for _, d := range ds {
						addrs = append(addrs, d.Addr.Addr())
					}
				}
			}
		}
	}
	view, err := look(sp.netns, addrs)
	if err != nil {
		return nil, err
	}
	out := map[routeKey]decision{}
	for i, port := range slices.Sorted(maps.Keys(sp.routes)) {
		svc := sp.routes[port]
		r := answers[svc]
		for _, v6 := range []bool{false, true} {
			d := decision{service: svc, expires: r.ans.Expires, answer: answerSignature(r.ans)}
			if i >= maxPortsPerNamespace {
				d.reason = fmt.Sprintf("the namespace has more than %d labelled ports; the socket path serves the lowest %d", maxPortsPerNamespace, maxPortsPerNamespace)
				out[newRouteKey(sp.cookie, port, v6)] = d
				continue
			}
			if r.err != nil {
				d.reason, d.unresolved = fmt.Sprintf("resolving %s: %v", svc, r.err), true
			} else {
				d.cands, d.reason = p.candidates(r.ans, r.direct, view, v6)
			}
			out[newRouteKey(sp.cookie, port, v6)] = d
		}
	}
	return out, nil
}

// candidates returns the endpoints a connect of the family v6 may be sent
// to directly, or nil and the reason the relay serves it instead.
func (p *Path) candidates(ans resolver.Answer, direct map[netip.AddrPort][]Direct, view *nsView, v6 bool) ([]candidate, string) {
	var cands []candidate
	var translated []string
	refused := 0
	target := 0
	for _, g := range ans.Groups {
		inGroup := 0
		for _, t := range g.Targets {
			target++
			for _, ep := range t.Endpoints {
				if !p.allowed(ep.Addr()) {
					refused++
					continue
				}
				addr := ep
				for _, d := range direct[ep] {
					if view.onSubnet(d.Subnet) && p.allowed(d.Addr.Addr()) {
						addr = d.Addr
						translated = append(translated, fmt.Sprintf("%s as %s", ep, addr))
						break
					}
				}
				a := addr.Addr().Unmap()
				switch {
				case a.IsLoopback() || a.IsUnspecified():
					return nil, fmt.Sprintf("endpoint %s is on the host's loopback, which the namespace cannot reach", addr)
				case !v6 && a.Is6():
					return nil, fmt.Sprintf("endpoint %s is IPv6 and the connect IPv4", addr)
				case !view.routable[a]:
					return nil, fmt.Sprintf("the namespace has no route to endpoint %s", addr)
				}
				inGroup++
				cands = append(cands, candidate{addr: netip.AddrPortFrom(a, addr.Port()), origin: ep, priority: g.Priority, target: target, weight: t.Weight})
			}
		}
		if inGroup > maxEndpoints {
			return nil, fmt.Sprintf("%d endpoints in one priority group; a kernel table holds %d", inGroup, maxEndpoints)
		}
	}
	if len(cands) == 0 {
		return nil, fmt.Sprintf("the target policy refuses all %d endpoints", refused)
	}
	why := "every endpoint is reachable from the namespace"
	if len(translated) > 0 {
		why += "; published ports reached at their containers: " + strings.Join(translated, ", ")
	}
	return cands, why
}

func (p *Path) allowed(a netip.Addr) bool {
	return p.cfg.Allowed == nil || p.cfg.Allowed(a) == nil
}

func (v *nsView) onSubnet(subnet netip.Prefix) bool {
	for _, pr := range v.prefixes {
		if subnet.Contains(pr.Addr()) {
			return true
		}
	}
	return false
}

// look enters the namespace ns and reads its addresses and whether it has
// a route to each of addrs. A UDP connect() does the route look-up and
// sends nothing.
func look(ns string, addrs []netip.Addr) (*nsView, error) {
	v := &nsView{routable: map[netip.Addr]bool{}}
	err := netns.Do(ns, func() error {
		ifs, err := net.InterfaceAddrs()
		if err != nil {
			return err
		}
		for _, a := range ifs {
			if n, ok := a.(*net.IPNet); ok {
				if addr, ok := netip.AddrFromSlice(n.IP); ok {
					ones, _ := n.Mask.Size()
					v.prefixes = append(v.prefixes, netip.PrefixFrom(addr.Unmap(), ones))
				}
			}
		}
		for _, a := range addrs {
			a = a.Unmap()
			if _, done := v.routable[a]; !done {
				v.routable[a] = routable(a)
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("looking into %s: %w", netns.Describe(ns), err)
	}
	return v, nil
}

func routable(a netip.Addr) bool {
	family := unix.AF_INET
	var sa unix.Sockaddr = &unix.SockaddrInet4{Port: 9, Addr: a.As4()}
	if a.Is6() {
		family = unix.AF_INET6
		sa = &unix.SockaddrInet6{Port: 9, Addr: a.As16()}
	}
	fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return false
	}
	defer unix.Close(fd)
	return unix.Connect(fd, sa) == nil
}

// noteAnswer records when a service's answer expires and whether it
// changed.
func (p *Path) noteAnswer(name string, ans resolver.Answer) (changed bool) {
	sig := answerSignature(ans)
	p.mu.Lock()
	defer p.mu.Unlock()
	s := p.services[name]
	if s == nil {
		return false // no longer served
	}
	s.expires = ans.Expires
	changed = s.answer != sig
	s.answer = sig
	return changed
}

func answerSignature(ans resolver.Answer) string {
	var b bytes.Buffer
	for _, g := range ans.Groups {
		fmt.Fprintf(&b, "p%d", g.Priority)
		for _, t := range g.Targets {
			fmt.Fprintf(&b, " w%d", t.Weight)
			for _, ep := range t.Endpoints {
				fmt.Fprintf(&b, ",%s", ep)
			}
		}
		b.WriteByte(';')
	}
	return b.String()
}
