package sockpath

import (
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"

	"github.com/connectable/connectable/netns"
	"github.com/connectable/connectable/resolver"
)

// Resolver gives a service's answer with its priority groups and weights.
type Resolver interface {
	Answer(ctx context.Context, service string) (resolver.Answer, error)
}

// Direct is a same-host instance's own address, and the subnet of the
// network on which it has that address.
type Direct struct {
	Addr   netip.AddrPort
	Subnet netip.Prefix
}

// Ports tells which endpoints are ports published by this host's engine,
// and which container address serves each.
type Ports interface {
	// Direct answers from what is known now, without waiting for the
	// engine: a set-up must not wait for a listing of every container.
	Direct(ctx context.Context, ep netip.AddrPort) ([]Direct, error)
	// Refresh brings what Direct knows up to date.
	Refresh(ctx context.Context) error
	// Changed receives when the published ports may have changed.
	Changed() <-chan struct{}
}

// Config configures a Path. Kernel and Resolver are required.
type Config struct {
	Kernel   *Kernel
	Resolver Resolver
	// Ports optionally translates endpoints published by this engine to
	// the containers' own addresses.
	Ports Ports
	// Allowed optionally applies the operator's target policy: an endpoint
	// it refuses is never written.
	Allowed func(netip.Addr) error
	// ProbeTimeout optionally bounds one probe of a dead endpoint; if 0, 1s.
	ProbeTimeout time.Duration
	// RetryMin and RetryMax optionally bound the back-off between probes
	// of a dead endpoint; if 0, 1s and 30s (the relay's).
	RetryMin, RetryMax time.Duration
	// Logger optionally receives the path's logs; if nil, slog.Default().
	Logger *slog.Logger
}

// Path is the socket data path: a reconcile.Path that writes, for each
// namespace and labelled port it can serve, the service's endpoints into
// the kernel's maps, keeps them fresh, and leaves the rest to the relay
// beneath. Create it with New.
type Path struct {
	cfg    Config
	k      *Kernel
	log    *slog.Logger
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	events *ringbuf.Reader
	probes chan struct{} // bounds the probes in flight

	mu         sync.Mutex
	spaces     map[string]*space // by key
	tables     map[string]*table // by signature
	ids        map[uint32]bool   // of tables, and of a previous run's until Sweep
	nextID     uint32
	services   map[string]*service
	dead       map[netip.AddrPort]*deadState
	leftRoutes map[routeKey]bool // a previous run's, not rewritten since
	leftTables map[uint32]bool
}

// space is one namespace's state.
type space struct {
	mu      sync.Mutex // serialises Apply, Remove and refreshes of the key
	key     string
	netns   string
	release func()
	cookie  uint64
	routes  map[uint16]string
	ports   map[routeKey]*portState // guarded by Path.mu
	gone    bool                    // removed; guarded by Path.mu
	// While a port is on the relay, the namespace is decided again at
	// recheck: a service may come to resolve, a route may appear.
	recheck      time.Time
	recheckEvery time.Duration
}

// Bounds of the work one namespace can cause.
const (
	// maxPortsPerNamespace is how many labelled ports of one namespace the
	// socket path serves; the rest stay on the relay, so that one tenant
	// cannot fill the kernel's routes map for all.
	maxPortsPerNamespace = 256
	recheckMin           = 5 * time.Second // for reasons other than resolution
	recheckMax           = time.Minute
	// parallelism bounds the lookups and namespace decisions a refresh
	// runs at once, so that one slow DNS name does not hold up the rest.
	parallelism = 8
)

// portState is how one port of one family is served.
type portState struct {
	service    string
	table      *table // nil: by the relay
	reason     string
	unresolved bool // on the relay because the service did not resolve
}

// table is one kernel table, shared by the namespaces whose port chooses
// from the same candidates.
type table struct {
	id    uint32
	sig   string
	svc   *service
	cands []candidate
	refs  int
	eps   []netip.AddrPort // what the kernel table serves now
}

// service is one label value the socket path serves.
type service struct {
	name    string
	id      uint32
	refs    int       // tables
	expires time.Time // when its answer should be asked for again
	answer  string    // the signature of the answer last used
}

type deadState struct {
	backoff time.Duration
	next    time.Time
	probing bool
}

// New returns a Path serving through k, adopting what a previous run left
// in its maps: those entries keep serving until Apply rewrites them or
// Sweep removes them.
func New(cfg Config) (*Path, error) {
	if cfg.Kernel == nil || cfg.Resolver == nil {
		return nil, errors.New("sockpath: Kernel and Resolver are required")
	}
	if cfg.ProbeTimeout <= 0 {
		cfg.ProbeTimeout = time.Second
	}
	if cfg.RetryMin <= 0 {
		cfg.RetryMin = time.Second
	}
	if cfg.RetryMax < cfg.RetryMin {
		cfg.RetryMax = max(30*time.Second, cfg.RetryMin)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	p := &Path{
		cfg: cfg, k: cfg.Kernel, log: log.With("component", "sockpath"),
		probes:     make(chan struct{}, 16),
		spaces:     map[string]*space{},
		tables:     map[string]*table{},
		ids:        map[uint32]bool{},
		services:   map[string]*service{},
		dead:       map[netip.AddrPort]*deadState{},
		leftRoutes: map[routeKey]bool{},
		leftTables: map[uint32]bool{},
		nextID:     1,
	}
	if err := p.adopt(); err != nil {
		return nil, err
	}
	ev, err := p.k.events()
	if err != nil {
		return nil, fmt.Errorf("reading the failure reports: %w", err)
	}
	p.events = ev
	p.ctx, p.cancel = context.WithCancel(context.Background())
	p.wg.Add(2)
	go p.readEvents()
	go p.refreshLoop()
	return p, nil
}

// adopt takes note of a previous run's entries.
func (p *Path) adopt() error {
	routes, err := p.k.routes()
	if err != nil {
		return fmt.Errorf("reading the routes map: %w", err)
	}
	for k := range routes {
		p.leftRoutes[k] = true
	}
	ids, err := p.k.tableIDs()
	if err != nil {
		return fmt.Errorf("reading the tables map: %w", err)
	}
	for _, id := range ids {
		p.leftTables[id] = true
		p.ids[id] = true
	}
	// The counters restart with the daemon, like every other counter of
	// it: the service numbers they are keyed by were the previous run's.
	if err := p.k.clearCounters(); err != nil {
		return fmt.Errorf("clearing the counters: %w", err)
	}
	dead, err := p.k.deadEndpoints()
	if err != nil {
		return fmt.Errorf("reading the dead endpoints: %w", err)
	}
	now := time.Now()
	for _, ap := range dead {
		p.dead[ap] = &deadState{backoff: p.cfg.RetryMin, next: now}
	}
	if len(routes) > 0 {
		p.log.Info("adopted the socket path of a previous run", "routes", len(routes), "tables", len(ids), "dead_endpoints", len(dead))
	}
	return nil
}

// Apply serves the ports of the namespace netns that the socket path can
// serve, and leaves the others to the relay beneath. It fails only when
// the namespace cannot be entered.
func (p *Path) Apply(ctx context.Context, key, ns string, routes map[uint16]string) error {
	p.mu.Lock()
	sp := p.spaces[key]
	if sp == nil {
		sp = &space{key: key, ports: map[routeKey]*portState{}}
		p.spaces[key] = sp
	}
	p.mu.Unlock()
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.netns != ns {
		if err := p.enter(sp, ns); err != nil {
			return err
		}
	}
	sp.routes = routes
	return p.converge(ctx, sp)
}

// enter switches sp to the namespace ns: the routes of the previous one
// go, and ns is held for refreshes.
func (p *Path) enter(sp *space, ns string) error {
	cookie, err := NetNSCookie(ns)
	if err != nil {
		return err
	}
	release := func() {}
	if netns.IsHandle(ns) {
		if release, err = netns.Hold(ns); err != nil {
			return err
		}
	}
	p.mu.Lock()
	p.dropPorts(sp, nil)
	p.mu.Unlock()
	if sp.release != nil {
		sp.release()
	}
	sp.netns, sp.cookie, sp.release = ns, cookie, release
	return nil
}

// NetNSCookie returns the cookie the kernel gives the namespace ns, the
// value bpf_get_netns_cookie returns for its sockets.
func NetNSCookie(ns string) (uint64, error) {
	var cookie uint64
	err := netns.Do(ns, func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		cookie, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("reading the cookie of %s: %w", netns.Describe(ns), err)
	}
	return cookie, nil
}

// Remove forgets the namespace key.
func (p *Path) Remove(ctx context.Context, key string) error {
	p.mu.Lock()
	sp := p.spaces[key]
	p.mu.Unlock()
	if sp == nil {
		return nil
	}
	sp.mu.Lock()
	defer sp.mu.Unlock()
	p.mu.Lock()
	p.dropPorts(sp, nil)
	sp.gone = true
	if p.spaces[key] == sp {
		delete(p.spaces, key)
	}
	p.mu.Unlock()
	if sp.release != nil {
		sp.release()
		sp.release = nil
	}
	return nil
}

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

// install makes the kernel serve sp as ds says. Called with p.mu.
func (p *Path) install(sp *space, ds map[routeKey]decision) bool {
	changed := map[uint16]bool{}
	for rk, d := range ds {
		old := sp.ports[rk]
		st := &portState{service: d.service, reason: d.reason, unresolved: d.unresolved}
		if d.cands != nil {
			t, err := p.acquire(d.service, d.cands)
			if err == nil {
				t.svc.expires, t.svc.answer = d.expires, d.answer
				if err = p.k.setRoute(rk, t.id); err != nil {
					p.release(t)
				}
			}
			if err != nil {
				st.reason = fmt.Sprintf("writing the kernel's maps: %v", err)
			} else {
				st.table = t
			}
		}
		if st.table == nil {
			if err := p.k.deleteRoute(rk); err != nil {
				p.log.Warn("deleting a route", "key", sp.key, "port", rk.Port, "err", err)
			}
		}
		delete(p.leftRoutes, rk)
		if old != nil && old.table != nil {
			p.release(old.table)
		}
		sp.ports[rk] = st
		// A failing lookup's message changes from one try to the next
		// (a source port, a server): still failing is no change.
		stillUnresolved := old != nil && old.unresolved && st.unresolved
		if old == nil || (old.table == nil) != (st.table == nil) || (old.reason != st.reason && !stillUnresolved) {
			changed[rk.Port] = true
		}
	}
	p.dropPorts(sp, ds)
	for _, port := range slices.Sorted(maps.Keys(changed)) {
		p.logDecision(sp, port)
	}
	return len(changed) > 0
}

// logDecision says in one line which path serves a port of sp, and why;
// the families are named apart only where they differ. Called with p.mu.
func (p *Path) logDecision(sp *space, port uint16) {
	var v4, v6 *portState
	for rk, st := range sp.ports {
		if rk.Port == port {
			if rk.Family == unix.AF_INET6 {
				v6 = st
			} else {
				v4 = st
			}
		}
	}
	if v4 == nil || v6 == nil {
		return
	}
	attrs := []any{"key", short(sp.key), "port", port, "service", v4.service}
	if pathName(v4) == pathName(v6) && v4.reason == v6.reason {
		attrs = append(attrs, "path", pathName(v4), "why", v4.reason)
	} else {
		attrs = append(attrs, "path", "ipv4 "+pathName(v4)+", ipv6 "+pathName(v6), "why_ipv4", v4.reason, "why_ipv6", v6.reason)
	}
	p.log.Info("serving a port", attrs...)
}

func pathName(st *portState) string {
	if st.table != nil {
		return "socket"
	}
	return "relay"
}

func family(rk routeKey) string {
	if rk.Family == unix.AF_INET6 {
		return "ipv6"
	}
	return "ipv4"
}

func short(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

// dropPorts removes the routes of sp that keep does not list. Called with
// p.mu.
func (p *Path) dropPorts(sp *space, keep map[routeKey]decision) {
	for rk, st := range sp.ports {
		if _, ok := keep[rk]; ok {
			continue
		}
		if err := p.k.deleteRoute(rk); err != nil {
			p.log.Warn("deleting a route", "key", sp.key, "port", rk.Port, "err", err)
		}
		if st.table != nil {
			p.release(st.table)
		}
		delete(sp.ports, rk)
	}
}

// acquire returns the table for the candidates, writing it if it is new.
// Called with p.mu.
func (p *Path) acquire(name string, cands []candidate) (*table, error) {
	sig := signature(name, cands)
	if t := p.tables[sig]; t != nil {
		t.refs++
		return t, nil
	}
	s := p.services[name]
	if s == nil {
		s = &service{name: name, id: p.serviceID()}
		p.services[name] = s
	}
	t := &table{id: p.tableID(), sig: sig, svc: s, cands: cands, refs: 1}
	s.refs++
	if err := p.write(t); err != nil {
		p.k.deleteTable(t.id)
		delete(p.ids, t.id)
		s.refs--
		p.forgetService(s)
		return nil, err
	}
	p.tables[sig] = t
	return t, nil
}

func (p *Path) serviceID() uint32 {
	used := map[uint32]bool{}
	for _, s := range p.services {
		used[s.id] = true
	}
	id := uint32(1)
	for used[id] {
		id++
	}
	return id
}

// tableID returns an id no table has, nor had lately: a table's id is not
// reused while connects may still hold its old contents.
func (p *Path) tableID() uint32 {
	for p.nextID == 0 || p.ids[p.nextID] {
		p.nextID++
	}
	p.ids[p.nextID] = true
	return p.nextID
}

// release drops a reference to t, deleting it with the last. Called with
// p.mu.
func (p *Path) release(t *table) {
	t.refs--
	if t.refs > 0 {
		return
	}
	delete(p.tables, t.sig)
	delete(p.ids, t.id)
	if err := p.k.deleteTable(t.id); err != nil {
		p.log.Warn("deleting a table", "service", t.svc.name, "err", err)
	}
	t.svc.refs--
	p.dropCounters(t.svc, t.eps)
	p.forgetService(t.svc)
}

func (p *Path) forgetService(s *service) {
	if s.refs <= 0 && p.services[s.name] == s {
		delete(p.services, s.name)
	}
}

// dropCounters deletes the kernel's counters of eps for s that no table of
// s serves any more.
func (p *Path) dropCounters(s *service, eps []netip.AddrPort) {
	for _, ep := range eps {
		inUse := false
		for _, t := range p.tables {
			if t.svc == s && slices.Contains(t.eps, ep) {
				inUse = true
				break
			}
		}
		if !inUse {
			p.k.deleteCounter(s.id, ep)
		}
	}
}

// write (re)writes t's kernel table from its candidates and the dead
// endpoints. Called with p.mu.
func (p *Path) write(t *table) error {
	eps, slots, _, err := apportion(t.cands, p.isDead)
	if err != nil {
		return err
	}
	for _, ep := range eps {
		if err := p.k.ensureCounter(t.svc.id, ep); err != nil {
			return fmt.Errorf("creating the counters of %s: %w", ep, err)
		}
	}
	if err := p.k.putTable(t.id, kernelTable(t.svc.id, eps, slots)); err != nil {
		return err
	}
	old := t.eps
	t.eps = eps
	p.dropCounters(t.svc, old)
	return nil
}

func (p *Path) isDead(ap netip.AddrPort) bool { return p.dead[ap] != nil }

// rewriteServing rewrites every table that chooses from ap. Called with
// p.mu.
func (p *Path) rewriteServing(ap netip.AddrPort) {
	for _, t := range p.tables {
		if slices.ContainsFunc(t.cands, func(c candidate) bool { return c.addr == ap }) {
			if err := p.write(t); err != nil {
				p.log.Warn("rewriting a table", "service", t.svc.name, "err", err)
			}
		}
	}
}

// readEvents takes the kernel's failure reports.
func (p *Path) readEvents() {
	defer p.wg.Done()
	for {
		rec, err := p.events.Read()
		if errors.Is(err, ringbuf.ErrClosed) {
			return
		}
		if err != nil {
			p.log.Warn("reading a failure report", "err", err)
			continue
		}
		var ev event
		if err := binary.Read(bytes.NewReader(rec.RawSample), nativeEndian, &ev); err != nil {
			p.log.Warn("decoding a failure report", "err", err)
			continue
		}
		p.failed(ev.Ep.addrPort(), ev.Kind)
	}
}

// failed takes ap out of every table until a probe reaches it again.
func (p *Path) failed(ap netip.AddrPort, kind uint32) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.dead[ap] != nil {
		return
	}
	p.dead[ap] = &deadState{backoff: p.cfg.RetryMin, next: time.Now().Add(p.cfg.RetryMin)}
	how := "failed"
	if kind == eventSYNRetry {
		how = "did not answer a SYN in time"
	}
	p.log.Warn("endpoint taken out of the socket path", "endpoint", ap, "why", "a connect to it "+how, "retry_in", p.cfg.RetryMin)
	p.rewriteServing(ap)
}

// refreshLoop re-resolves services whose answer expired, follows the
// engine's published ports and probes dead endpoints.
func (p *Path) refreshLoop() {
	defer p.wg.Done()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	var changed <-chan struct{}
	var relist <-chan time.Time
	if p.cfg.Ports != nil {
		changed = p.cfg.Ports.Changed()
		// Events are hints: the engine's listing is also asked for now
		// and then, and Changed follows if it differs.
		t := time.NewTicker(10 * time.Second)
		defer t.Stop()
		relist = t.C
	}
	for {
		select {
		case <-p.ctx.Done():
			return
		case <-relist:
			p.refreshPorts()
		case <-changed:
			p.refreshPorts()
			p.reconverge(func(*space) bool { return true })
		case <-tick.C:
			p.refreshAnswers()
			now := time.Now()
			p.reconverge(func(sp *space) bool { return !sp.recheck.IsZero() && !now.Before(sp.recheck) })
			p.probeDead()
		}
	}
}

func (p *Path) refreshPorts() {
	if err := p.cfg.Ports.Refresh(p.ctx); err != nil && p.ctx.Err() == nil {
		p.log.Warn("listing the engine's published ports", "err", err)
	}
}

// refreshAnswers asks again for every answer that expired and reconverges
// the namespaces of those that changed.
func (p *Path) refreshAnswers() {
	now := time.Now()
	p.mu.Lock()
	var due []string
	for name, s := range p.services {
		if !now.Before(s.expires) {
			due = append(due, name)
		}
	}
	p.mu.Unlock()
	var smu sync.Mutex
	stale := map[string]bool{}
	parallel(due, func(name string) {
		ans, err := p.cfg.Resolver.Answer(p.ctx, name)
		if err != nil {
			// The relay beneath logs resolution failures per connection;
			// the tables keep what they had until an answer comes.
			p.mu.Lock()
			if s := p.services[name]; s != nil {
				s.expires = now.Add(p.cfg.RetryMin)
			}
			p.mu.Unlock()
			return
		}
		if p.noteAnswer(name, ans) {
			smu.Lock()
			stale[name] = true
			smu.Unlock()
		}
	})
	if len(stale) > 0 {
		p.reconverge(func(sp *space) bool {
			return slices.ContainsFunc(slices.Collect(maps.Values(sp.routes)), func(s string) bool { return stale[s] })
		})
	}
}

// reconverge decides again for the namespaces that match.
func (p *Path) reconverge(match func(*space) bool) {
	p.mu.Lock()
	var sps []*space
	for _, sp := range p.spaces {
		sps = append(sps, sp)
	}
	p.mu.Unlock()
	parallel(sps, func(sp *space) {
		sp.mu.Lock()
		defer sp.mu.Unlock()
		if sp.netns != "" && !sp.gone && match(sp) {
			if err := p.converge(p.ctx, sp); err != nil && p.ctx.Err() == nil {
				p.log.Warn("refreshing a namespace", "key", short(sp.key), "err", err)
			}
		}
	})
}

// parallel runs fn on every item, at most parallelism at once, and
// returns when all are done.
func parallel[T any](items []T, fn func(T)) {
	sem := make(chan struct{}, parallelism)
	var wg sync.WaitGroup
	for _, it := range items {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			fn(it)
		}()
	}
	wg.Wait()
}

// probeDead starts a probe of every dead endpoint that is due one, from a
// namespace that would connect to it: the socket path's connects leave
// from there, not from the daemon's namespace.
func (p *Path) probeDead() {
	now := time.Now()
	p.mu.Lock()
	defer p.mu.Unlock()
	for ap, d := range p.dead {
		if d.probing || now.Before(d.next) {
			continue
		}
		from := p.probeFrom(ap)
		if from == "" && len(p.leftRoutes) > 0 {
			continue // adopted, and the namespaces that use it not applied yet
		}
		if from == "" { // no table chooses from it any more
			delete(p.dead, ap)
			if err := p.k.revive(ap); err != nil {
				p.log.Warn("clearing an endpoint's dead mark", "endpoint", ap, "err", err)
			}
			continue
		}
		select {
		case p.probes <- struct{}{}:
		default:
			return // enough in flight; the next tick goes on
		}
		d.probing = true
		p.wg.Add(1)
		go p.probe(ap, d, from)
	}
}

// probeFrom returns the namespace of a port whose table chooses from ap,
// or "". Called with p.mu.
func (p *Path) probeFrom(ap netip.AddrPort) string {
	for _, sp := range p.spaces {
		for _, st := range sp.ports {
			if st.table != nil && slices.ContainsFunc(st.table.cands, func(c candidate) bool { return c.addr == ap }) {
				return sp.netns
			}
		}
	}
	return ""
}

func (p *Path) probe(ap netip.AddrPort, d *deadState, from string) {
	defer p.wg.Done()
	defer func() { <-p.probes }()
	err := p.dialIn(from, ap)
	p.mu.Lock()
	defer p.mu.Unlock()
	d.probing = false
	if p.dead[ap] != d {
		return
	}
	if err != nil {
		d.backoff = min(2*d.backoff, p.cfg.RetryMax)
		d.next = time.Now().Add(d.backoff)
		// Keep the kernel's mark young, so that it does not lapse while
		// the daemon still sees the endpoint down.
		if err := p.k.markDead(ap); err != nil {
			p.log.Warn("marking an endpoint dead", "endpoint", ap, "err", err)
		}
		return
	}
	delete(p.dead, ap)
	if err := p.k.revive(ap); err != nil {
		p.log.Warn("reviving an endpoint", "endpoint", ap, "err", err)
	}
	p.log.Info("endpoint back in the socket path", "endpoint", ap)
	p.rewriteServing(ap)
}

// dialIn connects to ap from inside the namespace ns and hangs up.
func (p *Path) dialIn(ns string, ap netip.AddrPort) error {
	if netns.IsHandle(ns) {
		release, err := netns.Hold(ns)
		if err != nil {
			return err
		}
		defer release()
	}
	dialer := net.Dialer{Timeout: p.cfg.ProbeTimeout}
	return netns.Do(ns, func() error {
		c, err := dialer.DialContext(p.ctx, "tcp", ap.String())
		if err == nil {
			c.Close()
		}
		return err
	})
}

// Sweep removes what a previous run left for namespaces that no Apply
// claimed since New: call it once the first full desired state is applied.
func (p *Path) Sweep() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for rk := range p.leftRoutes {
		if err := p.k.deleteRoute(rk); err != nil {
			p.log.Warn("deleting a previous run's route", "err", err)
		}
	}
	for id := range p.leftTables {
		delete(p.ids, id)
		if err := p.k.deleteTable(id); err != nil {
			p.log.Warn("deleting a previous run's table", "err", err)
		}
	}
	if n := len(p.leftRoutes); n > 0 {
		p.log.Info("removed a previous run's routes", "routes", n, "tables", len(p.leftTables))
	}
	clear(p.leftRoutes)
	clear(p.leftTables)
}

// stop ends the goroutines and lets go of the namespaces.
func (p *Path) stop() {
	p.cancel()
	p.events.Close()
	p.wg.Wait()
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, sp := range p.spaces {
		if sp.release != nil {
			sp.release()
			sp.release = nil
		}
	}
}

// Close stops the path and removes it from the kernel: the programs are
// detached and the maps deleted, so new connects go to the relay (what
// SIGTERM does).
func (p *Path) Close() error {
	p.stop()
	return p.k.Remove()
}

// Abandon stops the path and leaves the kernel as it is: programs attached,
// entries serving, for the next run to adopt (what a crash leaves).
func (p *Path) Abandon() error {
	p.stop()
	return p.k.Close()
}

// Serving is how one namespace's port is served, for /status.
type Serving struct {
	Key       string
	Port      uint16
	Family    string // ipv4 (127.0.0.0/8, ::ffff:127.0.0.0/104) or ipv6 (::1)
	Service   string
	Path      string // socket or relay
	Why       string
	Endpoints []netip.AddrPort // what the kernel chooses from, for the socket path
}

// Status lists how every port of every namespace is served.
func (p *Path) Status() []Serving {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []Serving
	for _, sp := range p.spaces {
		for rk, st := range sp.ports {
			s := Serving{Key: sp.key, Port: rk.Port, Family: family(rk), Service: st.service, Path: "relay", Why: st.reason}
			if st.table != nil {
				s.Path = "socket"
				s.Endpoints = slices.Clone(st.table.eps)
			}
			out = append(out, s)
		}
	}
	slices.SortFunc(out, func(a, b Serving) int {
		return cmp.Or(cmp.Compare(a.Key, b.Key), cmp.Compare(a.Port, b.Port), cmp.Compare(a.Family, b.Family))
	})
	return out
}

// ServiceCounter is what the kernel counted for one endpoint of a service.
type ServiceCounter struct {
	Service  string
	Endpoint netip.AddrPort
	Connects uint64
	Failures uint64
}

// Counters reads the kernel's counters of the services served now.
func (p *Path) Counters() ([]ServiceCounter, error) {
	cs, err := p.k.counters()
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	names := map[uint32]string{}
	for _, s := range p.services {
		names[s.id] = s.name
	}
	p.mu.Unlock()
	var out []ServiceCounter
	for _, c := range cs {
		if name, ok := names[c.Service]; ok {
			out = append(out, ServiceCounter{Service: name, Endpoint: c.Endpoint, Connects: c.Connects, Failures: c.Failures})
		}
	}
	return out, nil
}
