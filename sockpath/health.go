package sockpath

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"slices"
	"time"

	"github.com/cilium/ebpf/ringbuf"

	"github.com/connectable/connectable/netns"
)

type deadState struct {
	backoff time.Duration
	next    time.Time
	probing bool
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
