package proxy

import (
	"net/netip"
	"time"

	endpointhealth "github.com/connectable/connectable/health"
	"github.com/connectable/connectable/internal/backoff"
)

// Passive health: what dials taught about endpoints, with no probes of our
// own. DNS (Consul) already drops instances whose checks fail; this covers
// the seconds until it does, and endpoints nobody checks. The table is
// package health's, shared in model with the socket path: with
// Server.Health set, every dial's outcome is also that path's
// confirmation, and endpoints it holds dead are dialled last.
const (
	// backoffMin is how long an endpoint that just failed is tried after
	// the others; every further failure in a row doubles it up to backoffMax.
	backoffMin = time.Second
	backoffMax = 30 * time.Second
	// healthForget and healthMaxEntries bound a service's table (package
	// health has the why).
	healthForget     = endpointhealth.Forget
	healthMaxEntries = endpointhealth.MaxEntries
)

// healthConfig is what every service's health table starts from; tests
// replace the clock and shorten the back-off.
type healthConfig struct {
	now      func() time.Time
	min, max time.Duration
	tracker  *endpointhealth.Tracker
}

func (c *healthConfig) init() {
	c.now = time.Now
	c.min, c.max = backoffMin, backoffMax
}

// health orders one service's endpoints by what recent dials taught about
// them.
type health struct {
	t *endpointhealth.Service
}

func (h *health) init(c healthConfig) {
	h.t = endpointhealth.NewService(c.now, backoff.Backoff{Min: c.min, Max: c.max}, c.tracker)
}

// order returns eps with the endpoints in back-off moved after the others.
func (h *health) order(eps []netip.AddrPort) []netip.AddrPort { return h.t.Order(eps) }

// failed records a failed dial of ep and extends its back-off.
func (h *health) failed(ep netip.AddrPort, err error) { h.t.Failed(ep, err) }

// succeeded records a successful dial of ep, which ends its back-off.
func (h *health) succeeded(ep netip.AddrPort) { h.t.Succeeded(ep) }

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
	var out []EndpointStatus
	for _, s := range h.t.Status(eps) {
		out = append(out, EndpointStatus{Addr: s.Addr, Healthy: s.Healthy, Failures: s.Failures, RetryAt: s.RetryAt,
			LastError: s.LastError, DialFailures: s.DialFailures})
	}
	return out
}

// addDialFailures adds the table's failure counts to out: an endpoint
// shared by several services counts the failures of all of them.
func (h *health) addDialFailures(out map[netip.AddrPort]uint64) { h.t.AddDialFailures(out) }
