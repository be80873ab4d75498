package sockpath

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/connectable/connectable/health"
	"github.com/connectable/connectable/netns"
	"github.com/connectable/connectable/resolver"
)

// Resolver gives a service's answer with its priority groups and weights.
type Resolver interface {
	Answer(ctx context.Context, service string) (resolver.Answer, error)
}

// Direct is a same-host instance's own address, and the subnet of the
// network on which it has that address. A client on that subnet is sent
// there, past the engine's NAT, unless Isolated.
type Direct struct {
	Addr   netip.AddrPort
	Subnet netip.Prefix
	// Isolated is true when containers on the network may not reach each
	// other (a bridge with enable_icc=false), or when that is not known.
	Isolated bool
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
	Kernel   Maps // a *Kernel from Load
	Resolver Resolver
	// Ports optionally translates endpoints published by this engine to
	// the containers' own addresses.
	Ports Ports
	// Allowed optionally applies the operator's target policy: an endpoint
	// it refuses is never written.
	Allowed func(netip.Addr) error
	// ProbeTimeout optionally bounds one probe of a dead endpoint, and one
	// check that a namespace can connect to an endpoint; if 0, 1s.
	ProbeTimeout time.Duration
	// ProbeNetNS optionally names the namespace probes dial from; if "",
	// the daemon's own, as the relay's dials do (tests set it).
	ProbeNetNS string
	// LookupTimeout optionally bounds one lookup of a service; if 0, 5s.
	LookupTimeout time.Duration
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
	k      Maps
	log    *slog.Logger
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	events eventReader
	// health holds the endpoints' evidence and probes them. Its lock may
	// be taken under p.mu; it calls back into the Path only without it.
	health     *health.Tracker
	badReports atomic.Uint64

	mu         sync.Mutex
	spaces     map[string]*space // by key
	tables     map[string]*table // by signature
	ids        map[uint32]bool   // of tables, and of a previous run's until Sweep
	nextID     uint32
	services   map[string]*service
	leftRoutes map[routeKey]bool // a previous run's, not rewritten since
	leftTables map[uint32]bool
	// installed is closed, and replaced, whenever decisions are
	// installed: Decided waits on it.
	installed chan struct{}
}

// space is one namespace's state. Its decisions are made by a worker of
// its own (work, in refresh.go), so that one tenant's slow names delay no
// other tenant.
type space struct {
	mu      sync.Mutex // serialises Apply, Remove and the installs of the key's decisions
	key     string
	netns   string
	release func()
	cookie  uint64
	routes  map[uint16]string
	ports   map[routeKey]*portState // guarded by Path.mu
	gone    bool                    // removed; guarded by Path.mu
	// reached holds, per service, the endpoints a TCP connect from the
	// namespace completed to, so that a decision checks each endpoint once;
	// guarded by Path.mu.
	reached map[string]map[netip.AddrPort]bool
	kick    chan struct{} // capacity 1: decide every service again
	checks  chan struct{} // bounds the namespace's reach checks in flight
	cancel  context.CancelFunc
	done    chan struct{} // closed when the worker has stopped; nil before it starts
}

// Bounds of the work one namespace can cause.
const (
	// maxPortsPerNamespace is how many labelled ports of one namespace the
	// socket path serves; the rest stay on the relay, so that one tenant
	// cannot fill the kernel's routes map for all.
	maxPortsPerNamespace = 256
	// maxAnswerEndpoints is how many endpoints of one answer the socket
	// path checks and writes; a service with more stays on the relay.
	maxAnswerEndpoints = 64
	// reachParallelism bounds one namespace's reach checks in flight.
	reachParallelism = 8
	recheckMin       = 5 * time.Second // for reasons other than resolution
	recheckMax       = time.Minute
	// refreshMin is the least time between two decisions of a service on
	// the socket path, whatever its answer's TTL.
	refreshMin = time.Second
)

// whyDeciding is the reason Status gives for a port not decided yet: the
// relay serves it meanwhile.
const whyDeciding = "deciding: the relay serves until the service resolves and the namespace is found to reach its endpoints"

// portState is how one port of one family is served.
type portState struct {
	service    string
	table      *table // nil: by the relay
	reason     string
	unresolved bool // on the relay because the service did not resolve
	pending    bool // on the relay until its first decision
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
	name string
	id   uint32
	refs int // tables
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
	if cfg.LookupTimeout <= 0 {
		cfg.LookupTimeout = 5 * time.Second
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
		spaces:     map[string]*space{},
		tables:     map[string]*table{},
		ids:        map[uint32]bool{},
		services:   map[string]*service{},
		leftRoutes: map[routeKey]bool{},
		leftTables: map[uint32]bool{},
		nextID:     1,
	}
	p.health = p.newTracker()
	if err := p.adopt(); err != nil {
		return nil, err
	}
	ev, err := p.k.events()
	if err != nil {
		return nil, fmt.Errorf("reading the failure reports: %w", err)
	}
	p.events = ev
	p.ctx, p.cancel = context.WithCancel(context.Background())
	p.wg.Add(4)
	go p.readEvents()
	go p.refreshLoop()
	go p.pruneMarks()
	go func() {
		defer p.wg.Done()
		p.health.Run(p.ctx)
	}()
	return p, nil
}

// Apply records the routes of the namespace ns and returns: a port no
// longer labelled, or labelled with another service, leaves the socket path
// at once, and the namespace's worker decides the others off the set-up,
// each service on its own, so that the relay beneath (the next Path the
// reconciler applies) waits for no lookup. Until its decision a port is
// the relay's. Apply fails only when the namespace cannot be entered.
func (p *Path) Apply(ctx context.Context, key, ns string, routes map[uint16]string) error {
	p.mu.Lock()
	sp := p.spaces[key]
	if sp == nil {
		sp = &space{key: key, ports: map[routeKey]*portState{}, reached: map[string]map[netip.AddrPort]bool{},
			kick: make(chan struct{}, 1), checks: make(chan struct{}, reachParallelism)}
		p.spaces[key] = sp
	}
	p.mu.Unlock()
	sp.mu.Lock()
	defer sp.mu.Unlock()
	changed := sp.netns != ns || !maps.Equal(sp.routes, routes)
	if sp.netns != ns {
		if err := p.enter(sp, ns); err != nil {
			return err
		}
	}
	sp.routes = maps.Clone(routes)
	p.mu.Lock()
	if !sp.gone {
		p.placeholders(sp)
		if sp.done == nil {
			changed = false // a new worker decides everything first
			var ctx context.Context
			ctx, sp.cancel = context.WithCancel(p.ctx)
			sp.done = make(chan struct{})
			p.wg.Add(1)
			go p.work(ctx, sp)
		}
	}
	p.mu.Unlock()
	if changed {
		// The same routes again keep their schedule: a port on the relay
		// waits for its back-off, not for the next Apply.
		sp.wake()
	}
	return nil
}

// wake asks sp's worker to decide every service again.
func (sp *space) wake() {
	select {
	case sp.kick <- struct{}{}:
	default:
	}
}

// placeholders brings sp's ports in line with its routes without deciding
// anything: a port gone or relabelled leaves the kernel, a new one is the
// relay's until decided, one beyond the bound is the relay's for good.
// Called with sp.mu and p.mu.
func (p *Path) placeholders(sp *space) {
	keep := map[routeKey]decision{}
	over := map[routeKey]decision{}
	for i, port := range slices.Sorted(maps.Keys(sp.routes)) {
		svc := sp.routes[port]
		for _, v6 := range []bool{false, true} {
			rk := newRouteKey(sp.cookie, port, v6)
			keep[rk] = decision{}
			st := sp.ports[rk]
			if i >= maxPortsPerNamespace {
				if st == nil || st.service != svc || st.table != nil {
					over[rk] = decision{service: svc, reason: fmt.Sprintf("the namespace has more than %d labelled ports; the socket path serves the lowest %d", maxPortsPerNamespace, maxPortsPerNamespace)}
				}
				continue
			}
			if st != nil && st.service == svc {
				continue // keeps serving as decided until decided again
			}
			if st != nil {
				p.dropPort(sp, rk, st)
			}
			sp.ports[rk] = &portState{service: svc, reason: whyDeciding, pending: true}
			delete(p.leftRoutes, rk)
		}
	}
	p.dropPorts(sp, keep)
	if len(over) > 0 {
		p.install(sp, over)
	}
	for svc := range sp.reached {
		if !slices.Contains(slices.Collect(maps.Values(sp.routes)), svc) {
			delete(sp.reached, svc)
		}
	}
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
	clear(sp.reached)
	// Under both locks: the health code reads them with p.mu alone.
	sp.netns, sp.cookie = ns, cookie
	p.mu.Unlock()
	if sp.release != nil {
		sp.release()
	}
	sp.release = release
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

// Remove forgets the namespace key, and waits for its worker to stop.
func (p *Path) Remove(ctx context.Context, key string) error {
	p.mu.Lock()
	sp := p.spaces[key]
	p.mu.Unlock()
	if sp == nil {
		return nil
	}
	sp.mu.Lock()
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
	cancel, done := sp.cancel, sp.done
	sp.mu.Unlock()
	// The worker's decisions in flight take sp.mu to install, and find
	// the namespace gone.
	if done != nil {
		cancel()
		<-done
	}
	return nil
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

// Decided waits until every port the namespace key had when it was last
// applied has had its first decision (socket path or relay), or ctx ends.
// Apply does not wait for DNS; the OCI hook, which must not return before
// the socket path serves a container whose endpoints only it can reach,
// waits here within its own bound.
func (p *Path) Decided(ctx context.Context, key string) error {
	for {
		p.mu.Lock()
		pending := false
		if sp := p.spaces[key]; sp != nil {
			for _, st := range sp.ports {
				pending = pending || st.pending
			}
		}
		if p.installed == nil {
			p.installed = make(chan struct{})
		}
		ch := p.installed
		p.mu.Unlock()
		if !pending {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("waiting for the socket path's decisions on %s: %w", short(key), ctx.Err())
		}
	}
}
