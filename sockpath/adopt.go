package sockpath

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"

	"github.com/connectable/connectable/health"
)

// adopt takes note of a previous run's entries. A table that holds an
// endpoint the current target policy refuses (the operator narrowed it
// before this start) goes at once, with the routes to it: those
// namespaces fall to the relay, which applies the policy, until Apply
// decides again.
func (p *Path) adopt() error {
	routes, err := p.k.routes()
	if err != nil {
		return fmt.Errorf("reading the routes map: %w", err)
	}
	ids, err := p.k.tableIDs()
	if err != nil {
		return fmt.Errorf("reading the tables map: %w", err)
	}
	refused := map[uint32]bool{}
	for _, id := range ids {
		if err := p.checkAdopted(id); err != nil {
			p.log.Warn("dropping a previous run's table the target policy refuses", "table", id, "err", err)
			refused[id] = true
			if err := p.k.deleteTable(id); err != nil {
				return fmt.Errorf("deleting a previous run's refused table %d: %w", id, err)
			}
			continue
		}
		p.leftTables[id] = true
		p.ids[id] = true
	}
	dropped := 0
	for k, id := range routes {
		if refused[id] {
			if err := p.k.deleteRoute(k); err != nil {
				return fmt.Errorf("deleting a previous run's route to a refused table: %w", err)
			}
			dropped++
			continue
		}
		p.leftRoutes[k] = true
	}
	if dropped > 0 {
		p.log.Warn("a previous run's routes to endpoints the target policy refuses now go to the relay", "routes", dropped, "tables", len(refused))
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
	// A previous run's marks: the daemon probes them, as its own evidence.
	for _, ap := range dead {
		p.health.Report(health.Daemon, ap)
	}
	if len(p.leftRoutes) > 0 {
		p.log.Info("adopted the socket path of a previous run", "routes", len(p.leftRoutes), "tables", len(p.leftTables), "dead_endpoints", len(dead))
	}
	return nil
}

// checkAdopted applies the target policy to every endpoint of a previous
// run's table id: the first refusal, or why the table cannot be read.
func (p *Path) checkAdopted(id uint32) error {
	if p.cfg.Allowed == nil {
		return nil
	}
	eps, err := p.k.tableEndpoints(id)
	if err != nil {
		return fmt.Errorf("reading it: %w", err)
	}
	for _, ep := range eps {
		if err := p.cfg.Allowed(ep.Addr()); err != nil {
			return err
		}
	}
	return nil
}

// tableEndpoints returns the endpoints table id holds.
func (k *Kernel) tableEndpoints(id uint32) ([]netip.AddrPort, error) {
	var inner *ebpf.Map
	if err := k.objs.Tables.Lookup(id, &inner); err != nil {
		return nil, err
	}
	defer inner.Close()
	var t kernTable
	if err := inner.Lookup(uint32(0), &t); err != nil {
		return nil, err
	}
	if int(t.Nendpoints) > len(t.Ep) {
		return nil, errors.New("more endpoints than a table holds")
	}
	out := make([]netip.AddrPort, 0, t.Nendpoints)
	for _, ep := range t.Ep[:t.Nendpoints] {
		out = append(out, ep.addrPort())
	}
	return out, nil
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
