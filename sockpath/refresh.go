package sockpath

import (
	"context"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/connectable/connectable/internal/backoff"
)

// refreshLoop follows the engine's published ports: when they change,
// every namespace decides again. The decisions themselves, and the
// refreshes of answers, are each namespace's worker's.
func (p *Path) refreshLoop() {
	defer p.wg.Done()
	if p.cfg.Ports == nil {
		return
	}
	changed := p.cfg.Ports.Changed()
	// Events are hints: the engine's listing is also asked for now and
	// then, and Changed follows if it differs.
	relist := time.NewTicker(10 * time.Second)
	defer relist.Stop()
	for {
		select {
		case <-p.ctx.Done():
			return
		case <-relist.C:
			p.refreshPorts()
		case <-changed:
			p.refreshPorts()
			p.wakeAll()
		}
	}
}

func (p *Path) refreshPorts() {
	if err := p.cfg.Ports.Refresh(p.ctx); err != nil && p.ctx.Err() == nil {
		p.log.Warn("listing the engine's published ports", "err", err)
	}
}

func (p *Path) wakeAll() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, sp := range p.spaces {
		sp.wake()
	}
}

// schedule is when one service of a namespace is decided next.
type schedule struct {
	due     time.Time
	running bool
	again   bool // woken while running: decide again when it returns
	reason  string
	retry   backoff.Backoff
}

// work decides sp's services, each in a goroutine of its own as soon as it
// is due: at first, after a wake, when its answer expires (on the socket
// path) or on a back-off (on the relay: a service may come to resolve, an
// endpoint to be reachable). It returns when ctx ends, once its
// decisions in flight have.
func (p *Path) work(ctx context.Context, sp *space) {
	defer p.wg.Done()
	defer close(sp.done)
	results := make(chan outcome)
	var wg sync.WaitGroup
	defer wg.Wait()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	scheds := map[string]*schedule{}
	for {
		now := time.Now()
		sp.mu.Lock()
		services := map[string]bool{}
		for i, port := range slices.Sorted(maps.Keys(sp.routes)) {
			if i < maxPortsPerNamespace {
				services[sp.routes[port]] = true
			}
		}
		sp.mu.Unlock()
		var next time.Time
		for name, s := range scheds {
			if !services[name] && !s.running {
				delete(scheds, name)
			}
		}
		for name := range services {
			s := scheds[name]
			if s == nil {
				s = &schedule{}
				scheds[name] = s
			}
			switch {
			case s.running:
			case !now.Before(s.due):
				s.running = true
				wg.Go(func() {
					o := p.decideService(ctx, sp, name)
					select {
					case results <- o:
					case <-ctx.Done():
					}
				})
			case next.IsZero() || s.due.Before(next):
				next = s.due
			}
		}
		timer.Stop()
		if !next.IsZero() {
			timer.Reset(time.Until(next))
		}
		select {
		case <-ctx.Done():
			return
		case <-sp.kick:
			for _, s := range scheds {
				s.again = s.running
				s.due = time.Time{}
			}
		case o := <-results:
			s := scheds[o.service]
			s.running = false
			if s.again || o.stale {
				s.again, s.due = false, time.Time{}
				continue
			}
			s.next(o, time.Now())
		case <-timer.C:
		}
	}
}

// next schedules the service's next decision after o.
func (s *schedule) next(o outcome, now time.Time) {
	switch {
	case o.socket:
		s.retry = backoff.Backoff{}
		s.due = o.expires
		if s.due.Before(now.Add(refreshMin)) {
			s.due = now.Add(refreshMin)
		}
	case o.unresolved:
		// A service that does not resolve yet is usually one about to
		// register: ask soon, then back off, so that labels naming
		// nothing cost the DNS server little.
		if s.retry.Min != time.Second {
			s.retry = backoff.Backoff{Min: time.Second, Max: recheckMax}
		}
		s.due = now.Add(s.retry.Next())
	default:
		if s.retry.Min != recheckMin || o.reason != s.reason {
			s.retry = backoff.Backoff{Min: recheckMin, Max: recheckMax}
		}
		s.due = now.Add(s.retry.Next())
	}
	s.reason = o.reason
}

// reconverge decides again, now, for the namespaces that match, and
// returns when they are decided.
func (p *Path) reconverge(match func(*space) bool) {
	p.mu.Lock()
	var sps []*space
	for _, sp := range p.spaces {
		if !sp.gone && match(sp) {
			sps = append(sps, sp)
		}
	}
	p.mu.Unlock()
	var wg sync.WaitGroup
	for _, sp := range sps {
		sp.mu.Lock()
		names := map[string]bool{}
		for i, port := range slices.Sorted(maps.Keys(sp.routes)) {
			if i < maxPortsPerNamespace {
				names[sp.routes[port]] = true
			}
		}
		sp.mu.Unlock()
		for name := range names {
			wg.Go(func() { p.decideService(p.ctx, sp, name) })
		}
	}
	wg.Wait()
}
