package sockpath

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"slices"
	"time"

	"github.com/connectable/connectable/health"
	"github.com/connectable/connectable/internal/backoff"
	"github.com/connectable/connectable/netns"
)

// newTracker returns the endpoint health of p: passive evidence from the
// kernel's reports, probes from the daemon's namespace.
func (p *Path) newTracker() *health.Tracker {
	return health.New(health.Config{
		Probe:   p.dialProbe,
		Changed: p.healthChanged,
		Cleared: func(ap netip.AddrPort) {
			if err := p.k.revive(ap); err != nil {
				p.log.Warn("clearing an endpoint's dead marks", "endpoint", ap, "err", err)
			}
		},
		InUse:   p.inUse,
		Users:   p.users,
		Backoff: backoff.Backoff{Min: p.cfg.RetryMin, Max: p.cfg.RetryMax},
		Logger:  p.log,
	})
}

// pruneMarks deletes, now and then, the kernel's marks it no longer heeds.
func (p *Path) pruneMarks() {
	defer p.wg.Done()
	tick := time.NewTicker(10 * time.Second)
	defer tick.Stop()
	for {
		select {
		case <-p.ctx.Done():
			return
		case <-tick.C:
			if _, err := p.k.pruneDead(); err != nil {
				p.log.Warn("deleting stale dead marks", "err", err)
			}
		}
	}
}

// readEvents takes the kernel's failure reports.
func (p *Path) readEvents() {
	defer p.wg.Done()
	for {
		ev, err := p.events.read()
		if errors.Is(err, errEventsClosed) {
			return
		}
		if err != nil {
			p.badReports.Add(1)
			p.log.Warn("reading a failure report", "err", err)
			continue
		}
		p.failed(ev)
	}
}

// failed takes a namespace's evidence against an endpoint. The kernel has
// already taken the endpoint out of that namespace's choices; the others
// keep it until the daemon's own probe fails.
func (p *Path) failed(ev kernEvent) {
	ap := ev.Ep.addrPort()
	how := "was refused or unreachable"
	if ev.Kind == eventSYNRetry {
		how = "did not answer a SYN in time"
	}
	if !p.health.Report(ev.Cookie, ap) {
		p.log.Debug("a namespace's report dropped: it holds too many", "endpoint", ap, "netns_cookie", ev.Cookie)
		return
	}
	// The namespace's own reach verdict is checked again at its next
	// decision: what it could connect to once it may no longer reach.
	p.mu.Lock()
	p.unverify(ev.Cookie, ap)
	p.mu.Unlock()
	p.log.Info("endpoint failed a namespace's connect; probing it", "endpoint", ap, "netns_cookie", ev.Cookie, "why", "a connect to it "+how)
}

// healthChanged rewrites the tables that choose from ap: the daemon
// confirmed it dead, or reached it again.
func (p *Path) healthChanged(ap netip.AddrPort) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.health.Dead(ap) {
		p.log.Warn("endpoint taken out of the socket path", "endpoint", ap, "why", "the daemon's probe could not reach it")
	} else {
		p.log.Info("endpoint back in the socket path", "endpoint", ap)
	}
	p.rewriteServing(ap)
}

// inUse tells whether a table chooses from ap, or may: a previous run's
// tables are not known until the namespaces that use them are applied.
func (p *Path) inUse(ap netip.AddrPort) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.leftRoutes) > 0 {
		return true
	}
	for _, t := range p.tables {
		if slices.ContainsFunc(t.cands, func(c candidate) bool { return c.addr == ap }) {
			return true
		}
	}
	return false
}

// users returns the cookies of the namespaces whose tables choose from ap.
func (p *Path) users(ap netip.AddrPort) []uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []uint64
	for _, sp := range p.spaces {
		for _, st := range sp.ports {
			if st.table != nil && slices.ContainsFunc(st.table.cands, func(c candidate) bool { return c.addr == ap }) {
				out = append(out, sp.cookie)
				break
			}
		}
	}
	return out
}

// dialProbe connects to ap from the daemon's namespace (or ProbeNetNS)
// and hangs up: the evidence the relay's own dials give, which no tenant
// can influence.
func (p *Path) dialProbe(ctx context.Context, ap netip.AddrPort) error {
	ns := p.cfg.ProbeNetNS
	if netns.IsHandle(ns) {
		release, err := netns.Hold(ns)
		if err != nil {
			return err
		}
		defer release()
	}
	dialer := net.Dialer{Timeout: p.cfg.ProbeTimeout}
	dial := func() error {
		c, err := dialer.DialContext(ctx, "tcp", ap.String())
		if err == nil {
			c.Close()
		}
		return err
	}
	if ns == "" {
		return dial()
	}
	return netns.Do(ns, dial)
}

// EndpointHealth is what the daemon holds about one endpoint, for /status.
type EndpointHealth struct {
	health.Endpoint
	// Namespaces names, by key, the namespaces whose evidence is held
	// ("daemon" for the daemon's own, "?" for one no longer applied).
	Namespaces []string
}

// Health lists the endpoints under suspicion, confirmed dead, or reached
// by a probe lately.
func (p *Path) Health() []EndpointHealth {
	snap := p.health.Snapshot()
	p.mu.Lock()
	keys := map[uint64]string{health.Daemon: "daemon"}
	for _, sp := range p.spaces {
		keys[sp.cookie] = sp.key
	}
	p.mu.Unlock()
	out := make([]EndpointHealth, 0, len(snap))
	for _, e := range snap {
		h := EndpointHealth{Endpoint: e}
		for _, c := range e.Reporters {
			name, ok := keys[c]
			if !ok {
				name = "?"
			}
			h.Namespaces = append(h.Namespaces, name)
		}
		out = append(out, h)
	}
	return out
}

// Tracker returns the endpoint health the socket path acts on, for the
// relay to share (proxy.Server.Health): its dials are the daemon's own
// evidence too.
func (p *Path) Tracker() *health.Tracker { return p.health }
