package sockpath

import (
	"maps"
	"slices"
	"sync"
	"time"
)

// refreshLoop re-resolves services whose answer expired and follows the
// engine's published ports.
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
