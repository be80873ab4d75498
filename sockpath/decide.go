package sockpath

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
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
}

// outcome is what deciding one service of a namespace came to, for its
// worker to schedule the next decision.
type outcome struct {
	service    string
	socket     bool // some port of it is on the socket path
	unresolved bool
	reason     string    // of the IPv4 decision: a change restarts the back-off
	expires    time.Time // of the answer decided on
	stale      bool      // the namespace changed meanwhile: decide again
}

// decideService resolves one service of sp, decides for each of its ports
// and families whether the socket path serves it and from which endpoints,
// and installs that at once: a slow name delays only its own ports.
func (p *Path) decideService(ctx context.Context, sp *space, name string) outcome {
	sp.mu.Lock()
	ns, cookie := sp.netns, sp.cookie
	sp.mu.Unlock()
	o := outcome{service: name}
	lctx, cancel := context.WithTimeout(ctx, p.cfg.LookupTimeout)
	ans, err := p.cfg.Resolver.Answer(lctx, name)
	cancel()
	if ctx.Err() != nil {
		return o
	}
	var ds [2]decision
	var reached map[netip.AddrPort]bool
	switch n := countEndpoints(ans); {
	case err != nil:
		d := decision{service: name, reason: fmt.Sprintf("resolving %s: %v", name, err), unresolved: true}
		ds = [2]decision{d, d}
	case n > maxAnswerEndpoints:
		d := decision{service: name, reason: fmt.Sprintf("%s has %d endpoints; the socket path takes at most %d", name, n, maxAnswerEndpoints)}
		ds = [2]decision{d, d}
	default:
		o.expires = ans.Expires
		direct := p.directs(ctx, ans)
		p.mu.Lock()
		known := maps.Clone(sp.reached[name])
		p.mu.Unlock()
		var view *nsView
		view, err = p.look(ctx, sp, ns, ans, direct, known)
		for i, v6 := range []bool{false, true} {
			ds[i] = decision{service: name}
			if err != nil {
				ds[i].reason = err.Error()
			} else {
				ds[i].cands, ds[i].reason = p.candidates(ans, direct, view, v6)
			}
		}
		if view != nil {
			reached = view.reached()
		}
	}
	o.reason, o.unresolved = ds[0].reason, ds[0].unresolved

	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.netns != ns || sp.cookie != cookie {
		o.stale = true
		return o
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if sp.gone {
		return o
	}
	out := map[routeKey]decision{}
	for i, port := range slices.Sorted(maps.Keys(sp.routes)) {
		if i >= maxPortsPerNamespace {
			break
		}
		if sp.routes[port] == name {
			out[newRouteKey(cookie, port, false)] = ds[0]
			out[newRouteKey(cookie, port, true)] = ds[1]
		}
	}
	if len(out) == 0 {
		return o // no longer labelled
	}
	if reached != nil {
		sp.reached[name] = reached
	}
	p.install(sp, out)
	for rk := range out {
		if st := sp.ports[rk]; st != nil && st.table != nil {
			o.socket = true
		}
	}
	return o
}

func countEndpoints(ans resolver.Answer) int {
	n := 0
	for _, g := range ans.Groups {
		for _, t := range g.Targets {
			n += len(t.Endpoints)
		}
	}
	return n
}

// directs returns, for each endpoint of ans that is a port this engine
// publishes, the containers' own addresses.
func (p *Path) directs(ctx context.Context, ans resolver.Answer) map[netip.AddrPort][]Direct {
	out := map[netip.AddrPort][]Direct{}
	if p.cfg.Ports == nil {
		return out
	}
	for _, g := range ans.Groups {
		for _, t := range g.Targets {
			for _, ep := range t.Endpoints {
				ds, err := p.cfg.Ports.Direct(ctx, ep)
				if err != nil {
					p.log.Warn("reading the engine's published ports", "err", err)
					continue
				}
				out[ep] = ds
			}
		}
	}
	return out
}

// nsView is what the namespace itself says: its addresses, which
// endpoints it has a route to, and which it connected to.
type nsView struct {
	prefixes []netip.Prefix
	routable map[netip.Addr]bool
	// reach is, for each endpoint checked, nil if a TCP connect from the
	// namespace completed; nil map: not checked yet.
	reach map[netip.AddrPort]error
}

// reached returns the endpoints the namespace connected to.
func (v *nsView) reached() map[netip.AddrPort]bool {
	out := map[netip.AddrPort]bool{}
	for ap, err := range v.reach {
		if err == nil {
			out[ap] = true
		}
	}
	return out
}

// look enters the namespace ns and reads its addresses and its routes to
// the endpoints of ans and their direct addresses; then it checks, with a
// TCP connect from the namespace, each endpoint the socket path would
// write and known does not vouch for. A route is not reachability: every
// bridge container has a default route, and Docker drops what crosses from
// one bridge network to another.
func (p *Path) look(ctx context.Context, sp *space, ns string, ans resolver.Answer, direct map[netip.AddrPort][]Direct, known map[netip.AddrPort]bool) (*nsView, error) {
	var addrs []netip.Addr
	for _, g := range ans.Groups {
		for _, t := range g.Targets {
			for _, ep := range t.Endpoints {
				addrs = append(addrs, ep.Addr())
				for _, d := range direct[ep] {
					addrs = append(addrs, d.Addr.Addr())
				}
			}
		}
	}
	// The namespace's slots bound its threads in namespaces too.
	select {
	case sp.checks <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	view, err := look(ns, addrs)
	<-sp.checks
	if err != nil {
		return nil, err
	}
	// What would be written if every endpoint were reachable.
	want := map[netip.AddrPort]bool{}
	for _, v6 := range []bool{false, true} {
		cands, _ := p.candidates(ans, direct, view, v6)
		for _, c := range cands {
			want[c.addr] = true
		}
	}
	view.reach = map[netip.AddrPort]error{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for ap := range want {
		if known[ap] {
			mu.Lock()
			view.reach[ap] = nil
			mu.Unlock()
			continue
		}
		select {
		case sp.checks <- struct{}{}:
		case <-ctx.Done():
			wg.Wait()
			return nil, ctx.Err()
		}
		wg.Go(func() {
			defer func() { <-sp.checks }()
			err := connectFrom(ctx, ns, ap, p.cfg.ProbeTimeout)
			mu.Lock()
			view.reach[ap] = err
			mu.Unlock()
		})
	}
	wg.Wait()
	return view, nil
}

// candidates returns the endpoints a connect of the family v6 may be sent
// to directly, or nil and the reason the relay serves it instead.
func (p *Path) candidates(ans resolver.Answer, direct map[netip.AddrPort][]Direct, view *nsView, v6 bool) ([]candidate, string) {
	var cands []candidate
	var translated, unreached []string
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
					// Only a client on the container's own network, where
					// containers may talk to each other, reaches it there.
					if !d.Isolated && view.onSubnet(d.Subnet) && p.allowed(d.Addr.Addr()) {
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
				case v6 && a.Is4():
					// An IPV6_V6ONLY socket cannot be sent to a v4-mapped
					// address: the relay serves [::1] for IPv4 endpoints.
					return nil, fmt.Sprintf("endpoint %s is IPv4 and the connect IPv6", addr)
				case !view.routable[a]:
					return nil, fmt.Sprintf("the namespace has no route to endpoint %s", addr)
				}
				if view.reach != nil {
					// An endpoint the namespace cannot connect to is left
					// out of its table (the others serve it directly);
					// with none left, the relay, which dials from the
					// host, serves the port.
					if err, checked := view.reach[netip.AddrPortFrom(a, addr.Port())]; !checked || err != nil {
						unreached = append(unreached, fmt.Sprintf("%s (%v)", addr, cmp.Or(err, errors.New("not checked"))))
						continue
					}
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
		if len(unreached) > 0 {
			return nil, "the namespace cannot connect to endpoint " + strings.Join(unreached, ", ")
		}
		return nil, fmt.Sprintf("the target policy refuses all %d endpoints", refused)
	}
	why := "the namespace connects to every endpoint"
	if len(unreached) > 0 {
		why = "the namespace connects to these endpoints; left out, as it cannot connect to them: " + strings.Join(unreached, ", ")
	}
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
	family, sa := sockaddr(netip.AddrPortFrom(a, 9))
	fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return false
	}
	defer unix.Close(fd)
	return unix.Connect(fd, sa) == nil
}
