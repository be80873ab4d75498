package proxy

import (
	"net/netip"
	"sync"
	"time"
)

// Passive health: what dials taught about endpoints, with no probes of our
// own. DNS (Consul) already drops instances whose checks fail; this covers
// the seconds until it does, and endpoints nobody checks.
const (
	// backoffMin is how long an endpoint that just failed is tried after
	// the others; every further failure in a row doubles it up to backoffMax.
	backoffMin = time.Second
	backoffMax = 30 * time.Second
	// healthForget drops what is known about an endpoint that has not
	// failed for this long: it has recovered or left DNS. It is far longer
	// than backoffMax, so forgetting never lifts a live penalty.
	healthForget = 10 * time.Minute
	// healthMaxEntries bounds one service's table whatever the churn of
	// its endpoints. Tables are per service, so one tenant's service with
	// thousands of dead endpoints cannot evict another service's back-off
	// state; a service's table goes when no namespace routes to it.
	healthMaxEntries = 1024
)

// healthConfig is what every service's health table starts from; tests
// replace the clock and shorten the back-off.
type healthConfig struct {
	now      func() time.Time
	min, max time.Duration
}

func (c *healthConfig) init() {
	c.now = time.Now
	c.min, c.max = backoffMin, backoffMax
}

// health orders one service's endpoints by what recent dials taught about
// them. Only endpoints that have failed are in the table, so a healthy
// fleet costs nothing.
type health struct {
	mu        sync.Mutex
	now       func() time.Time // tests replace it
	min, max  time.Duration    // tests shorten them
	eps       map[netip.AddrPort]*endpointHealth
	lastPrune time.Time
}

type endpointHealth struct {
	streak       int       // failures in a row
	until        time.Time // tried after the healthy ones until then
	lastFail     time.Time
	lastErr      string
	dialFailures uint64
}

func (h *health) init(c healthConfig) {
	h.now = c.now
	h.min, h.max = c.min, c.max
	h.eps = make(map[netip.AddrPort]*endpointHealth)
}

// order returns eps with the endpoints in back-off moved, in their order,
// after the others. All of them stay: when every endpoint failed lately, the
// next connection still tries them all rather than giving up.
func (h *health) order(eps []netip.AddrPort) []netip.AddrPort {
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.eps) == 0 {
		return eps
	}
	now := h.now()
	penalized := func(ep netip.AddrPort) bool {
		e := h.eps[ep]
		return e != nil && now.Before(e.until)
	}
	n := 0
	for _, ep := range eps {
		if penalized(ep) {
			n++
		}
	}
	if n == 0 || n == len(eps) {
		return eps
	}
	out := make([]netip.AddrPort, 0, len(eps))
	for _, ep := range eps {
		if !penalized(ep) {
			out = append(out, ep)
		}
	}
	for _, ep := range eps {
		if penalized(ep) {
			out = append(out, ep)
		}
	}
	return out
}

// failed records a failed dial of ep and extends its back-off.
func (h *health) failed(ep netip.AddrPort, err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	now := h.now()
	h.prune(now)
	e := h.eps[ep]
	if e == nil {
		e = &endpointHealth{}
		h.eps[ep] = e
	}
	e.streak++
	e.dialFailures++
	e.lastFail = now
	e.lastErr = err.Error()
	e.until = now.Add(h.backoff(e.streak))
}

// backoff is the penalty after streak failures in a row: min, doubling, at
// most max.
func (h *health) backoff(streak int) time.Duration {
	d := h.min
	for i := 1; i < streak && d < h.max; i++ {
		d *= 2
	}
	return min(d, h.max)
}

// succeeded records a successful dial of ep, which ends its back-off.
func (h *health) succeeded(ep netip.AddrPort) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if e := h.eps[ep]; e != nil {
		e.streak = 0
		e.until = time.Time{}
	}
}

// prune forgets endpoints that have not failed for healthForget, at most
// once a minute, and keeps the table within healthMaxEntries.
func (h *health) prune(now time.Time) {
	if now.Sub(h.lastPrune) < time.Minute && len(h.eps) < healthMaxEntries {
		return
	}
	h.lastPrune = now
	for ep, e := range h.eps {
		if now.Sub(e.lastFail) > healthForget {
			delete(h.eps, ep)
		}
	}
	// Still full: an endpoint storm. Make room for a quarter more at once,
	// so pruning stays rare: first endpoints out of back-off, then any.
	target := healthMaxEntries * 3 / 4
	for ep, e := range h.eps {
		if len(h.eps) <= target {
			return
		}
		if !now.Before(e.until) {
			delete(h.eps, ep)
		}
	}
	for ep := range h.eps {
		if len(h.eps) <= target {
			return
		}
		delete(h.eps, ep)
	}
}

// EndpointStatus is what the server knows about one endpoint.
type EndpointStatus struct {
	Addr netip.AddrPort
	// Healthy is false while the endpoint is in back-off, tried after the
	// others until RetryAt, and when it is Refused.
	Healthy bool
	// Refused is true when the target policy forbids dialling the
	// endpoint: connections skip it, and LastError says which rule.
	Refused bool
	// Failures counts failed dials in a row; 0 once one succeeded.
	Failures int
	RetryAt  time.Time
	// LastError is the error of the last failed dial, if one is remembered.
	LastError string
	// DialFailures counts failed dials since the endpoint last entered the
	// table (it is forgotten after healthForget without failures).
	DialFailures uint64
}

func (h *health) status(eps []netip.AddrPort) []EndpointStatus {
	h.mu.Lock()
	defer h.mu.Unlock()
	now := h.now()
	out := make([]EndpointStatus, 0, len(eps))
	for _, ep := range eps {
		st := EndpointStatus{Addr: ep, Healthy: true}
		if e := h.eps[ep]; e != nil {
			st.Healthy = !now.Before(e.until)
			st.Failures = e.streak
			st.LastError = e.lastErr
			st.DialFailures = e.dialFailures
			if !st.Healthy {
				st.RetryAt = e.until
			}
		}
		out = append(out, st)
	}
	return out
}

// addDialFailures adds the table's failure counts to out: an endpoint
// shared by several services counts the failures of all of them.
func (h *health) addDialFailures(out map[netip.AddrPort]uint64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for ep, e := range h.eps {
		out[ep] += e.dialFailures
	}
}
