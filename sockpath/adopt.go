package sockpath

import (
	"fmt"
	"time"
)

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
