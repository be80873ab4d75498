package sockpath

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"

	"golang.org/x/sys/unix"
)

// install makes the kernel serve the ports of sp that ds names as it
// says; the other ports keep what they have. Called with p.mu.
func (p *Path) install(sp *space, ds map[routeKey]decision) bool {
	if p.installed != nil {
		close(p.installed) // wakes Decided
		p.installed = nil
	}
	changed := map[uint16]bool{}
	for rk, d := range ds {
		old := sp.ports[rk]
		st := &portState{service: d.service, reason: d.reason, unresolved: d.unresolved}
		if d.cands != nil {
			t, err := p.acquire(d.service, d.cands)
			if err == nil {
				if err = p.k.setRoute(rk, t.id); err != nil {
					p.release(t)
				}
			}
			if err != nil {
				st.reason = fmt.Sprintf("writing the kernel's maps: %v", err)
			} else {
				st.table = t
			}
		}
		if st.table == nil {
			if err := p.k.deleteRoute(rk); err != nil {
				p.log.Warn("deleting a route", "key", sp.key, "port", rk.Port, "err", err)
			}
		}
		delete(p.leftRoutes, rk)
		if old != nil && old.table != nil {
			p.release(old.table)
		}
		sp.ports[rk] = st
		// A failing lookup's message changes from one try to the next
		// (a source port, a server): still failing is no change.
		stillUnresolved := old != nil && old.unresolved && st.unresolved
		if old == nil || old.pending || (old.table == nil) != (st.table == nil) || (old.reason != st.reason && !stillUnresolved) {
			changed[rk.Port] = true
		}
	}
	for _, port := range slices.Sorted(maps.Keys(changed)) {
		p.logDecision(sp, port)
	}
	return len(changed) > 0
}

// logDecision says in one line which path serves a port of sp, and why;
// the families are named apart only where they differ. Called with p.mu.
func (p *Path) logDecision(sp *space, port uint16) {
	var v4, v6 *portState
	for rk, st := range sp.ports {
		if rk.Port == port {
			if rk.Family == unix.AF_INET6 {
				v6 = st
			} else {
				v4 = st
			}
		}
	}
	if v4 == nil || v6 == nil || v4.pending || v6.pending {
		return
	}
	attrs := []any{"key", short(sp.key), "port", port, "service", v4.service}
	if pathName(v4) == pathName(v6) && v4.reason == v6.reason {
		attrs = append(attrs, "path", pathName(v4), "why", v4.reason)
	} else {
		attrs = append(attrs, "path", "ipv4 "+pathName(v4)+", ipv6 "+pathName(v6), "why_ipv4", v4.reason, "why_ipv6", v6.reason)
	}
	p.log.Info("serving a port", attrs...)
}

func pathName(st *portState) string {
	if st.table != nil {
		return "socket"
	}
	return "relay"
}

func family(rk routeKey) string {
	if rk.Family == unix.AF_INET6 {
		return "ipv6"
	}
	return "ipv4"
}

func short(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

// dropPorts removes the routes of sp that keep does not list. Called with
// p.mu.
func (p *Path) dropPorts(sp *space, keep map[routeKey]decision) {
	for rk, st := range sp.ports {
		if _, ok := keep[rk]; !ok {
			p.dropPort(sp, rk, st)
		}
	}
}

// dropPort removes the port rk of sp, served as st. Called with p.mu.
func (p *Path) dropPort(sp *space, rk routeKey, st *portState) {
	if err := p.k.deleteRoute(rk); err != nil {
		p.log.Warn("deleting a route", "key", sp.key, "port", rk.Port, "err", err)
	}
	if st.table != nil {
		p.release(st.table)
	}
	delete(sp.ports, rk)
}

// acquire returns the table for the candidates, writing it if it is new.
// Called with p.mu.
func (p *Path) acquire(name string, cands []candidate) (*table, error) {
	sig := signature(name, cands)
	if t := p.tables[sig]; t != nil {
		t.refs++
		return t, nil
	}
	s := p.services[name]
	if s == nil {
		s = &service{name: name, id: p.serviceID()}
		p.services[name] = s
	}
	t := &table{id: p.tableID(), sig: sig, svc: s, cands: cands, refs: 1}
	s.refs++
	if err := p.write(t); err != nil {
		p.k.deleteTable(t.id)
		delete(p.ids, t.id)
		s.refs--
		p.forgetService(s)
		return nil, err
	}
	p.tables[sig] = t
	return t, nil
}

func (p *Path) serviceID() uint32 {
	used := map[uint32]bool{}
	for _, s := range p.services {
		used[s.id] = true
	}
	id := uint32(1)
	for used[id] {
		id++
	}
	return id
}

// tableID returns an id no table has, nor had lately: a table's id is not
// reused while connects may still hold its old contents.
func (p *Path) tableID() uint32 {
	for p.nextID == 0 || p.ids[p.nextID] {
		p.nextID++
	}
	p.ids[p.nextID] = true
	return p.nextID
}

// release drops a reference to t, deleting it with the last. Called with
// p.mu.
func (p *Path) release(t *table) {
	t.refs--
	if t.refs > 0 {
		return
	}
	delete(p.tables, t.sig)
	delete(p.ids, t.id)
	if err := p.k.deleteTable(t.id); err != nil {
		p.log.Warn("deleting a table", "service", t.svc.name, "err", err)
	}
	t.svc.refs--
	p.dropCounters(t.svc, t.eps)
	p.forgetService(t.svc)
}

func (p *Path) forgetService(s *service) {
	if s.refs <= 0 && p.services[s.name] == s {
		delete(p.services, s.name)
	}
}

// dropCounters deletes the kernel's counters of eps for s that no table of
// s serves any more.
func (p *Path) dropCounters(s *service, eps []netip.AddrPort) {
	for _, ep := range eps {
		inUse := false
		for _, t := range p.tables {
			if t.svc == s && slices.Contains(t.eps, ep) {
				inUse = true
				break
			}
		}
		if !inUse {
			p.k.deleteCounter(s.id, ep)
		}
	}
}

// write (re)writes t's kernel table from its candidates and the endpoints
// confirmed dead. Called with p.mu.
func (p *Path) write(t *table) error {
	eps, slots, _, err := apportion(t.cands, p.isDead)
	if err != nil {
		return err
	}
	for _, ep := range eps {
		if err := p.k.ensureCounter(t.svc.id, ep); err != nil {
			return fmt.Errorf("creating the counters of %s: %w", ep, err)
		}
	}
	if err := p.k.putTable(t.id, kernelTable(t.svc.id, eps, slots)); err != nil {
		return err
	}
	old := t.eps
	t.eps = eps
	p.dropCounters(t.svc, old)
	return nil
}

// isDead tells whether the daemon confirmed ap dead: what one namespace
// alone saw fail leaves only that namespace's choices, in the kernel.
func (p *Path) isDead(ap netip.AddrPort) bool { return p.health.Dead(ap) }

// rewriteServing rewrites every table that chooses from ap. Called with
// p.mu.
func (p *Path) rewriteServing(ap netip.AddrPort) {
	for _, t := range p.tables {
		if slices.ContainsFunc(t.cands, func(c candidate) bool { return c.addr == ap }) {
			if err := p.write(t); err != nil {
				p.log.Warn("rewriting a table", "service", t.svc.name, "err", err)
			}
		}
	}
}
