package proxy

import (
	"cmp"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/connectable/connectable/netns"
)

// Stats is a snapshot of the server's counters, for metrics. Counters only
// grow, except gauges named Active and the per-endpoint failures of
// endpoints that have been forgotten (see EndpointStatus.DialFailures).
type Stats struct {
	// Services holds the counters of every service a connection was routed
	// to, while some namespace routes to it (or a connection to it is still
	// live): a service no label names any more drops out, and its series
	// with it.
	Services map[string]ServiceStats
	// Namespaces holds the connections being served in each namespace that
	// is applied now, by key.
	Namespaces map[string]int64
	// DialFailures counts failed dials per endpoint that failed lately.
	DialFailures map[netip.AddrPort]uint64
	// Failovers counts connections relayed to an endpoint after at least
	// one other failed to connect.
	Failovers uint64
	// Rejected counts connections closed without a dial: direct connections
	// to the proxy port, ports without a route, unreadable destinations.
	Rejected uint64
	// LimitedNamespace and LimitedGlobal count connections reset at accept
	// because their namespace, or the whole server, was at its cap of
	// concurrent connections.
	LimitedNamespace, LimitedGlobal uint64
	// BytesUp and BytesDown total the bytes of finished connections, from
	// clients to backends and back.
	BytesUp, BytesDown uint64
}

// ServiceStats counts the connections routed to one service.
type ServiceStats struct {
	Accepted uint64 // routed to the service
	Active   int64  // being dialled or relayed now
	Failed   uint64 // closed because no endpoint connected
	// Refused counts endpoints the target policy refused to dial (each
	// refusal once per connection that met it).
	Refused uint64
	// BytesUp and BytesDown count the bytes of finished connections.
	BytesUp, BytesDown uint64
}

// counters is the server's accounting. The connection path only touches
// atomics once it holds its service's counters.
type counters struct {
	mu        sync.Mutex
	services  map[string]*serviceCounters
	rejected  atomic.Uint64
	failovers atomic.Uint64
	limitedNS atomic.Uint64
	limitedG  atomic.Uint64
}

type serviceCounters struct {
	name                      string
	accepted, failed, refused atomic.Uint64
	active                    atomic.Int64
	bytesUp, bytesDown        atomic.Uint64
	tried                     atomic.Pointer[[]netip.AddrPort] // endpoints of the last dial phase, in order
	health                    health                           // this service's endpoints only
}

// service returns the counters of a service, creating them on first use.
// Services come from container labels, and prune drops those no label
// names any more, so the map stays small.
func (c *counters) service(name string, hc healthConfig) *serviceCounters {
	c.mu.Lock()
	defer c.mu.Unlock()
	sc := c.services[name]
	if sc == nil {
		if c.services == nil {
			c.services = make(map[string]*serviceCounters)
		}
		sc = &serviceCounters{name: name}
		sc.health.init(hc)
		c.services[name] = sc
	}
	return sc
}

// prune forgets the services that no namespace routes to and no
// connection uses. A connection that took its counters just before keeps
// them and counts into them alone; the service starts from zero if it
// comes back, which Prometheus reads as a counter reset.
func (c *counters) prune(routed map[string]bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for name, sc := range c.services {
		if !routed[name] && sc.active.Load() == 0 {
			delete(c.services, name)
		}
	}
}

// routedServices is the set of services some applied namespace routes to.
func (s *Server) routedServices() map[string]bool {
	routed := make(map[string]bool)
	for _, sp := range s.spaces() {
		for _, svc := range *sp.routes.Load() {
			routed[svc] = true
		}
	}
	return routed
}

func (sc *serviceCounters) setTried(eps []netip.AddrPort) { sc.tried.Store(&eps) }

// Stats returns a snapshot of the server's counters. It never waits for an
// Apply or Remove in progress.
func (s *Server) Stats() Stats {
	s.init()
	st := Stats{
		Services:         make(map[string]ServiceStats),
		Namespaces:       make(map[string]int64),
		DialFailures:     make(map[netip.AddrPort]uint64),
		Failovers:        s.stats.failovers.Load(),
		Rejected:         s.stats.rejected.Load(),
		LimitedNamespace: s.stats.limitedNS.Load(),
		LimitedGlobal:    s.stats.limitedG.Load(),
	}
	s.stats.prune(s.routedServices())
	s.stats.mu.Lock()
	for name, sc := range s.stats.services {
		sc.health.addDialFailures(st.DialFailures)
		ss := ServiceStats{
			Accepted:  sc.accepted.Load(),
			Active:    sc.active.Load(),
			Failed:    sc.failed.Load(),
			Refused:   sc.refused.Load(),
			BytesUp:   sc.bytesUp.Load(),
			BytesDown: sc.bytesDown.Load(),
		}
		st.Services[name] = ss
		st.BytesUp += ss.BytesUp
		st.BytesDown += ss.BytesDown
	}
	s.stats.mu.Unlock()
	for _, sp := range s.spaces() {
		st.Namespaces[sp.key] = sp.active.Load()
	}
	return st
}

// NamespaceStatus describes one applied namespace, for a status page.
type NamespaceStatus struct {
	Key   string
	NetNS string // netns.Describe of what Apply was given
	Port  uint16 // the proxy port P the rules redirect to
	IPv6  bool   // whether [::1]:P listens too
	// Active counts the connections being served in the namespace.
	Active int64
	Routes []RouteStatus // by port
}

// RouteStatus describes one labelled port of a namespace.
type RouteStatus struct {
	Port    uint16
	Service string
	// Endpoints are the service's endpoints in the order the last
	// connection to it tried them, with their passive-health state; empty
	// before the first connection.
	Endpoints []EndpointStatus
}

// Namespaces describes every applied namespace, ordered by key. Like Stats,
// it never waits for an Apply or Remove in progress: a namespace being set
// up appears once its rules are in, one being re-applied shows the routes
// in effect.
func (s *Server) Namespaces() []NamespaceStatus {
	s.init()
	var out []NamespaceStatus
	for _, sp := range s.spaces() {
		ns := NamespaceStatus{
			Key:    sp.key,
			NetNS:  netns.Describe(sp.netns),
			Port:   sp.port,
			IPv6:   sp.v6 != nil,
			Active: sp.active.Load(),
		}
		routes := *sp.routes.Load()
		for _, port := range slices.Sorted(maps.Keys(routes)) {
			ns.Routes = append(ns.Routes, RouteStatus{Port: port, Service: routes[port]})
		}
		out = append(out, ns)
	}
	for i := range out {
		for j := range out[i].Routes {
			r := &out[i].Routes[j]
			s.stats.mu.Lock()
			sc := s.stats.services[r.Service]
			s.stats.mu.Unlock()
			if sc == nil {
				continue
			}
			if tried := sc.tried.Load(); tried != nil {
				r.Endpoints = sc.health.status(*tried)
				for k := range r.Endpoints {
					e := &r.Endpoints[k]
					if err := s.policy.check(e.Addr.Addr()); err != nil {
						e.Healthy, e.Refused, e.LastError = false, true, err.Error()
					}
				}
			}
		}
	}
	slices.SortFunc(out, func(a, b NamespaceStatus) int { return cmp.Compare(a.Key, b.Key) })
	return out
}
