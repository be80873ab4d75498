package docker

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"

	dockerapi "github.com/fsouza/go-dockerclient"
)

// portsMaxAge bounds how long a listing of published ports is used without
// an event saying it changed: events are hints (the library drops some, a
// stream can be down), so a missed one costs at most this much staleness.
const portsMaxAge = 2 * time.Second

// PortTable maps ports published by this engine's containers to the
// containers' own addresses. A service registered the way Registrator does
// it (this host's address and a -P published port) can thereby be reached
// at the container itself, skipping the engine's NAT, by a client that is
// on one of the container's networks.
//
// It lists the running containers at most once per portsMaxAge (2s), or
// again after Invalidate; concurrent Lookups share one listing. Its methods
// are safe for concurrent use. It starts no goroutines, so it needs no
// Close.
type PortTable struct {
	eng engine
	log *slog.Logger
	// now and hostAddrs are replaced by tests: the clock to age
	// listings, and this host's addresses (those an unspecified binding
	// listens on).
	now       func() time.Time
	hostAddrs func() ([]netip.Addr, error)

	changed chan struct{} // capacity 1

	mu   sync.Mutex
	gen  uint64        // incremented by Invalidate
	cur  *portListing  // latest successful listing, nil before the first
	call *portListCall // the listing in flight, if any
}

// Direct is a container's own address for a published port.
type Direct struct {
	Addr      netip.AddrPort // container IP : private port
	Subnet    netip.Prefix   // the subnet of the network Addr is on (a single-address prefix if the engine gave no length)
	Container string         // short ID, for logs
	Network   string         // the ID of the network Addr is on, "" if the engine gave none
	// ICC is true when the engine says containers on Network may connect
	// to each other: a bridge without com.docker.network.bridge.enable_icc
	// set to false, or an overlay. It is false when that is not known, so
	// that a user sends a client there only when it is known to work. An
	// internal network (no way out) still lets its containers talk.
	ICC bool
}

// networkLister lists the engine's networks; the engine client does, and
// test fakes may not.
type networkLister interface {
	ListNetworks() ([]dockerapi.Network, error)
}

// iccOption is the bridge driver's option that, set to "false", drops
// traffic between containers of the network (docker network create -o,
// or the engine's --icc=false for the default bridge).
const iccOption = "com.docker.network.bridge.enable_icc"

// allowsICC reports whether containers on n may connect to each other.
func allowsICC(n dockerapi.Network) bool {
	switch n.Driver {
	case "bridge":
		return n.Options[iccOption] != "false"
	case "overlay":
		return true
	}
	return false
}

// portListing is one listing of the published ports, immutable once built.
type portListing struct {
	gen     uint64    // p.gen when it was started
	at      time.Time // when it was started: it is no newer than that
	entries []portEntry
	hosts   []netip.Addr // sorted
}

// portEntry is one TCP binding of a published port and one address of its
// container. A container on no network with an address has one entry with
// a zero direct, so that the port still counts as published.
type portEntry struct {
	public uint16
	// bind is the binding's host address: a specific one, an unspecified
	// one (every host address of its family) or invalid (the engine gave
	// none: every host address).
	bind   netip.Addr
	direct Direct
}

// portListCall is one listing that concurrent Lookups wait for.
type portListCall struct {
	gen  uint64
	done chan struct{} // closed when l and err are set
	l    *portListing
	err  error
}

// NewPortTable returns a PortTable for the engine c talks to (see
// NewClient). logger optionally receives its log lines; if nil,
// slog.Default().
func NewPortTable(c *dockerapi.Client, logger *slog.Logger) *PortTable {
	return newPortTable(c, logger)
}

func newPortTable(eng engine, logger *slog.Logger) *PortTable {
	if logger == nil {
		logger = slog.Default()
	}
	return &PortTable{
		eng:       eng,
		log:       logger.With("component", "docker"),
		now:       time.Now,
		hostAddrs: interfaceAddrs,
		changed:   make(chan struct{}, 1),
	}
}

// interfaceAddrs returns the addresses of the daemon's network namespace:
// those a binding to 0.0.0.0 or :: accepts connections on when the daemon
// runs, as it should, in the host's.
func interfaceAddrs() ([]netip.Addr, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil, fmt.Errorf("listing this host's addresses: %w", err)
	}
	var out []netip.Addr
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok {
			if ip, ok := netip.AddrFromSlice(n.IP); ok {
				out = append(out, ip.Unmap())
			}
		}
	}
	return out, nil
}

// Invalidate forgets the cached listing: the next Lookup lists again. The
// watcher calls it on every container lifecycle event. It also signals
// Changed: nothing else would list again after a container died, and a
// user should stop sending connects to it as soon as it can.
func (p *PortTable) Invalidate() {
	p.mu.Lock()
	p.gen++
	p.mu.Unlock()
	p.signal()
}

func (p *PortTable) signal() {
	select {
	case p.changed <- struct{}{}:
	default:
	}
}

// Changed receives a value (it holds at most one) after Invalidate, and
// after a listing differs from the one before it, so that a user of Lookup
// evaluates its endpoints again. The first listing does not count: it
// differs from nothing that a Lookup could have returned.
func (p *PortTable) Changed() <-chan struct{} { return p.changed }

// Lookup returns, for an endpoint hostAddr:hostPort that is a TCP port
// published by a running container of this engine, that container's
// address and private port on each network it is attached to, with the
// network's subnet, sorted by address. ok is false when no container
// publishes it. A binding to a specific host address matches that address
// only; one to 0.0.0.0 (::) matches every IPv4 (IPv6) address of this host,
// and one without an address every address of this host. Docker lists a
// port published on both families as two bindings, 0.0.0.0 and ::.
//
// The error is the engine's (or the context's) when a listing was needed
// and failed.
func (p *PortTable) Lookup(ctx context.Context, ep netip.AddrPort) (direct []Direct, ok bool, err error) {
	addr := ep.Addr().Unmap()
	if !addr.IsValid() || ep.Port() == 0 {
		return nil, false, nil
	}
	l, err := p.listing(ctx)
	if err != nil {
		return nil, false, err
	}
	direct, ok = l.lookup(ep)
	return direct, ok, nil
}

// Cached is Lookup answered from the latest listing, however old or
// invalidated, so that it waits for the engine only before the first
// listing. A caller that must not wait (a container's set-up) uses it, and
// asks again after Changed, having called Refresh.
func (p *PortTable) Cached(ctx context.Context, ep netip.AddrPort) (direct []Direct, ok bool, err error) {
	p.mu.Lock()
	l := p.cur
	p.mu.Unlock()
	if l == nil {
		return p.Lookup(ctx, ep)
	}
	direct, ok = l.lookup(ep)
	return direct, ok, nil
}

// Refresh makes the cached listing current (listing again if it is older
// than portsMaxAge or invalidated); Changed follows if it differs.
func (p *PortTable) Refresh(ctx context.Context) error {
	_, err := p.listing(ctx)
	return err
}

// lookup answers Lookup from l.
func (l *portListing) lookup(ep netip.AddrPort) (direct []Direct, ok bool) {
	addr := ep.Addr().Unmap()
	if !addr.IsValid() || ep.Port() == 0 {
		return nil, false
	}
	_, isHost := slices.BinarySearchFunc(l.hosts, addr, netip.Addr.Compare)
	i, _ := slices.BinarySearchFunc(l.entries, ep.Port(), func(e portEntry, port uint16) int { return cmp.Compare(e.public, port) })
	for ; i < len(l.entries) && l.entries[i].public == ep.Port(); i++ {
		e := &l.entries[i]
		switch {
		case e.bind == addr:
		case !e.bind.IsValid() && isHost:
		case e.bind.IsUnspecified() && e.bind.Is4() == addr.Is4() && isHost:
		default:
			continue
		}
		ok = true
		if e.direct.Addr.IsValid() {
			direct = append(direct, e.direct)
		}
	}
	slices.SortFunc(direct, compareDirect)
	// A port published on 0.0.0.0 and on "" (Podman) matches twice.
	return slices.Compact(direct), ok
}

// listing returns a listing no older than portsMaxAge and started after
// the last Invalidate before the call: the cached one, the one in flight,
// or a new one.
func (p *PortTable) listing(ctx context.Context) (*portListing, error) {
	for {
		p.mu.Lock()
		gen := p.gen
		if l := p.cur; l != nil && l.gen == gen && p.now().Sub(l.at) < portsMaxAge {
			p.mu.Unlock()
			return l, nil
		}
		if c := p.call; c != nil {
			p.mu.Unlock()
			select {
			case <-c.done:
			case <-ctx.Done():
				return nil, fmt.Errorf("listing published ports: %w", context.Cause(ctx))
			}
			switch {
			case c.gen < gen:
				continue // started before an Invalidate this caller saw
			case c.err != nil && isCanceled(c.err) && ctx.Err() == nil:
				continue // the listing caller gave up; list for ourselves
			case c.err != nil:
				return nil, c.err
			}
			return c.l, nil
		}
		c := &portListCall{gen: gen, done: make(chan struct{})}
		p.call = c
		p.mu.Unlock()

		c.l, c.err = p.list(ctx, gen)
		p.mu.Lock()
		p.call = nil
		prev := p.cur
		if c.err == nil {
			p.cur = c.l
		}
		p.mu.Unlock()
		close(c.done)
		if c.err != nil {
			return nil, c.err
		}
		if prev != nil && !prev.same(c.l) {
			p.log.Debug("published ports changed", "bindings", len(c.l.entries))
			p.signal()
		}
		return c.l, nil
	}
}

// list takes one listing: the running containers and this host's addresses.
func (p *PortTable) list(ctx context.Context, gen uint64) (*portListing, error) {
	at := p.now()
	lctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	cs, err := p.eng.ListContainers(dockerapi.ListContainersOptions{Context: lctx})
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("listing published ports: %w", context.Cause(ctx))
		}
		return nil, fmt.Errorf("listing published ports: %w", err)
	}
	hosts, err := p.hostAddrs()
	if err != nil {
		return nil, err
	}
	hosts = slices.Clone(hosts)
	slices.SortFunc(hosts, netip.Addr.Compare)
	entries := portEntries(cs)
	p.markICC(lctx, entries)
	return &portListing{gen: gen, at: at, entries: entries, hosts: slices.Compact(hosts)}, nil
}

// markICC sets ICC on the entries whose network is known to allow traffic
// between its containers. A failure leaves them false: a user then does
// not send a client to a container directly.
func (p *PortTable) markICC(ctx context.Context, entries []portEntry) {
	nl, ok := p.eng.(networkLister)
	if !ok || !slices.ContainsFunc(entries, func(e portEntry) bool { return e.direct.Network != "" }) {
		return
	}
	type result struct {
		nets []dockerapi.Network
		err  error
	}
	// The client's ListNetworks takes no context: the call runs apart, and
	// the listing waits for it no longer than for the containers' (the
	// call ends when the engine answers or drops the connection).
	done := make(chan result, 1)
	go func() {
		nets, err := nl.ListNetworks()
		done <- result{nets, err}
	}()
	var r result
	select {
	case r = <-done:
	case <-ctx.Done():
		r.err = context.Cause(ctx)
	}
	if r.err != nil {
		p.log.Warn("listing networks: published ports are not reached at their containers meanwhile", "err", r.err)
		return
	}
	icc := map[string]bool{}
	for _, n := range r.nets {
		icc[n.ID] = allowsICC(n)
	}
	for i := range entries {
		entries[i].direct.ICC = icc[entries[i].direct.Network]
	}
}

// portEntries returns the TCP bindings of published ports in cs, one per
// container address, sorted.
func portEntries(cs []dockerapi.APIContainers) []portEntry {
	var out []portEntry
	for _, c := range cs {
		var directs []Direct
		for _, bp := range c.Ports {
			if bp.Type != "tcp" || !validPort(bp.PublicPort) || !validPort(bp.PrivatePort) {
				continue
			}
			bind, err := netip.ParseAddr(bp.IP)
			if err != nil {
				bind = netip.Addr{} // "": every address; garbage: the same, as the engine listens somewhere
			}
			bind = bind.Unmap()
			if directs == nil {
				directs = containerAddrs(c)
			}
			for _, d := range directs {
				if d.Addr.IsValid() {
					d.Addr = netip.AddrPortFrom(d.Addr.Addr(), uint16(bp.PrivatePort))
				}
				out = append(out, portEntry{public: uint16(bp.PublicPort), bind: bind, direct: d})
			}
		}
	}
	slices.SortFunc(out, func(a, b portEntry) int {
		return cmp.Or(cmp.Compare(a.public, b.public), a.bind.Compare(b.bind), compareDirect(a.direct, b.direct))
	})
	return slices.Compact(out)
}

func validPort(p int64) bool { return p > 0 && p <= 65535 }

// containerAddrs returns c's addresses (port 0) with their subnets, or one
// zero Direct naming c if it has none.
func containerAddrs(c dockerapi.APIContainers) []Direct {
	var out []Direct
	add := func(addr string, bits int, network string) {
		ip, err := netip.ParseAddr(addr)
		if err != nil || ip.IsUnspecified() {
			return
		}
		ip = ip.Unmap().WithZone("")
		if bits <= 0 || bits > ip.BitLen() {
			bits = ip.BitLen() // no subnet known: claim no neighbours
		}
		out = append(out, Direct{Addr: netip.AddrPortFrom(ip, 0), Subnet: netip.PrefixFrom(ip, bits).Masked(), Container: short(c.ID), Network: network})
	}
	for _, n := range c.Networks.Networks {
		add(n.IPAddress, n.IPPrefixLen, n.NetworkID)
		add(n.GlobalIPv6Address, n.GlobalIPv6PrefixLen, n.NetworkID)
	}
	if len(out) == 0 {
		return []Direct{{Container: short(c.ID)}}
	}
	return out
}

func compareDirect(a, b Direct) int {
	return cmp.Or(a.Addr.Compare(b.Addr), cmp.Compare(a.Subnet.Bits(), b.Subnet.Bits()),
		a.Subnet.Addr().Compare(b.Subnet.Addr()), cmp.Compare(a.Container, b.Container), cmp.Compare(a.Network, b.Network))
}

// same reports whether l and m would answer every Lookup alike.
func (l *portListing) same(m *portListing) bool {
	return slices.Equal(l.entries, m.entries) && slices.Equal(l.hosts, m.hosts)
}

func isCanceled(err error) bool {
	return errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}
