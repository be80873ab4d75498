// Package health holds what connectable knows of its endpoints' health and
// who taught it: a namespace's own failed connects (passive evidence, seen
// by the kernel on the socket path) or the daemon's own dials (a probe, or
// the relay's dial), which no tenant can influence.
//
// Passive evidence is never trusted beyond the namespace that saw it: it
// makes the Tracker probe the endpoint from the daemon, and only a failed
// probe (or a failed dial of the relay) confirms the endpoint dead for
// everyone. Every namespace's share of the work is bounded: how many
// endpoints it may have under suspicion at once, and how many probes run
// for it at once, with the probes shared round robin across namespaces, so
// that one namespace's many dead endpoints never delay another's revival.
package health

import (
	"context"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/connectable/connectable/internal/backoff"
)

// Daemon is the namespace of evidence the daemon found itself: a relay
// dial, or an entry adopted from a previous run.
const Daemon uint64 = 0

// Config configures a Tracker. Probe is required.
type Config struct {
	// Probe dials ep from the daemon's own network namespace.
	Probe func(ctx context.Context, ep netip.AddrPort) error
	// Changed is told, without the Tracker's lock, when ep became
	// confirmed dead or came back: the tables that hold it are rewritten.
	Changed func(ep netip.AddrPort)
	// Cleared is told, without the Tracker's lock, when the passive marks
	// on ep are to go: it came back after the daemon confirmed it dead, or
	// nothing uses it any more. A probe that reaches an endpoint only a
	// namespace saw fail leaves that namespace's marks to lapse: what the
	// namespace saw may be true for it alone (a firewall of its own).
	Cleared func(ep netip.AddrPort)
	// InUse optionally tells whether anything still chooses from ep; an
	// endpoint nothing uses is forgotten rather than probed.
	InUse func(ep netip.AddrPort) bool
	// Users optionally lists the namespaces that choose from ep. An
	// endpoint confirmed dead is then probed on the turn of the one of
	// them with the fewest endpoints to probe, rather than of whoever
	// reported it first: a namespace with many dead endpoints of its own
	// cannot hold back the revival of one that others use.
	Users func(ep netip.AddrPort) []uint64
	// Backoff is the schedule of probes of a dead endpoint, and of how
	// soon passive evidence against an endpoint a probe reached is
	// probed again. Default 1s to 30s.
	Backoff backoff.Backoff
	// PerNamespace bounds the endpoints one namespace may hold under
	// suspicion at once; its further reports are dropped. Default 64.
	PerNamespace int
	// Probes bounds the probes in flight, and ProbesPerNamespace those
	// for one namespace's evidence. Defaults 16 and 2.
	Probes, ProbesPerNamespace int
	Logger                     *slog.Logger
	now                        func() time.Time // tests replace it
}

// Tracker is the endpoint health shared by the socket path and the relay.
// Run schedules its probes.
type Tracker struct {
	cfg  Config
	log  *slog.Logger
	wake chan struct{}

	mu       sync.Mutex
	eps      map[netip.AddrPort]*entry
	owners   []uint64       // namespaces with evidence, in round-robin order
	next     int            // index into owners of the next to be served
	held     map[uint64]int // endpoints under suspicion by namespace
	inFlight map[uint64]int // probes running by owner
	running  int
	dropped  uint64 // reports over a namespace's bound
}

// entry is one endpoint under suspicion or confirmed dead.
type entry struct {
	owner     uint64          // the namespace whose evidence came first
	reporters map[uint64]bool // namespaces whose evidence is held
	suspect   bool            // a probe is due
	confirmed bool            // the daemon could not reach it: out of every table
	probing   bool
	b         backoff.Backoff
	due       time.Time // of the next probe
	quiet     time.Time // a probe reached it: new evidence waits until then
	lastErr   string
	since     time.Time
}

// New returns a Tracker; start Run to probe.
func New(cfg Config) *Tracker {
	if cfg.Backoff.Min <= 0 {
		cfg.Backoff.Min = time.Second
	}
	if cfg.Backoff.Max < cfg.Backoff.Min {
		cfg.Backoff.Max = max(30*time.Second, cfg.Backoff.Min)
	}
	if cfg.PerNamespace <= 0 {
		cfg.PerNamespace = 64
	}
	if cfg.Probes <= 0 {
		cfg.Probes = 16
	}
	if cfg.ProbesPerNamespace <= 0 {
		cfg.ProbesPerNamespace = 2
	}
	if cfg.now == nil {
		cfg.now = time.Now
	}
	for _, f := range []*func(netip.AddrPort){&cfg.Changed, &cfg.Cleared} {
		if *f == nil {
			*f = func(netip.AddrPort) {}
		}
	}
	if cfg.InUse == nil {
		cfg.InUse = func(netip.AddrPort) bool { return true }
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	return &Tracker{
		cfg: cfg, log: log, wake: make(chan struct{}, 1),
		eps: map[netip.AddrPort]*entry{}, held: map[uint64]int{}, inFlight: map[uint64]int{},
	}
}

// Report takes a namespace's evidence against ep. It returns false when
// the namespace already holds as many endpoints under suspicion as it may,
// and the report is dropped.
func (t *Tracker) Report(ns uint64, ep netip.AddrPort) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	e := t.eps[ep]
	if e != nil && e.reporters[ns] {
		return true
	}
	if t.held[ns] >= t.cfg.PerNamespace {
		t.dropped++
		return false
	}
	now := t.cfg.now()
	if e == nil {
		e = &entry{owner: ns, reporters: map[uint64]bool{}, b: t.cfg.Backoff, since: now}
		t.eps[ep] = e
		t.addOwner(ns)
	}
	e.reporters[ns] = true
	t.held[ns]++
	if !e.suspect && !e.confirmed {
		e.suspect = true
		e.due = now
		if e.quiet.After(now) {
			e.due = e.quiet
		}
		e.since = now
	}
	t.poke()
	return true
}

// Failed takes the daemon's own failed dial of ep (the relay's): the
// endpoint is confirmed dead at once.
func (t *Tracker) Failed(ep netip.AddrPort, err error) {
	users := t.users(ep)
	t.mu.Lock()
	if t.eps[ep] == nil {
		// The relay dials endpoints the socket path may not serve at
		// all: hold only those something chooses from.
		t.mu.Unlock()
		if !t.cfg.InUse(ep) {
			return
		}
		t.mu.Lock()
	}
	e := t.eps[ep]
	if e == nil {
		e = &entry{owner: Daemon, reporters: map[uint64]bool{}, b: t.cfg.Backoff}
		t.eps[ep] = e
		t.addOwner(Daemon)
	}
	changed := t.failedLocked(ep, e, err, users)
	t.mu.Unlock()
	if changed {
		t.cfg.Changed(ep)
	}
	t.poke()
}

func (t *Tracker) users(ep netip.AddrPort) []uint64 {
	if t.cfg.Users == nil {
		return nil
	}
	return t.cfg.Users(ep)
}

// Succeeded takes the daemon's own successful dial of ep (the relay's).
func (t *Tracker) Succeeded(ep netip.AddrPort) {
	t.mu.Lock()
	e := t.eps[ep]
	if e == nil || e.probing {
		t.mu.Unlock()
		return
	}
	changed := t.succeededLocked(ep, e)
	t.mu.Unlock()
	if changed {
		t.cfg.Changed(ep)
		t.cfg.Cleared(ep)
	}
}

// Dead reports whether the daemon confirmed ep dead: it goes out of every
// table.
func (t *Tracker) Dead(ep netip.AddrPort) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	e := t.eps[ep]
	return e != nil && e.confirmed
}

// Dropped returns how many reports were dropped over a namespace's bound.
func (t *Tracker) Dropped() uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.dropped
}

// Endpoint is what the Tracker holds about one endpoint, for /status.
type Endpoint struct {
	Endpoint  netip.AddrPort
	State     string   // "suspect" (a namespace saw it fail), "dead" (confirmed) or "reachable" (a probe reached it lately)
	Reporters []uint64 // the namespaces whose evidence is held (Daemon: the daemon's own)
	Since     time.Time
	NextProbe time.Time // zero if none is due
	LastError string
}

// Snapshot lists every endpoint the Tracker holds.
func (t *Tracker) Snapshot() []Endpoint {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []Endpoint
	for ep, e := range t.eps {
		s := Endpoint{Endpoint: ep, State: "reachable", Since: e.since, LastError: e.lastErr}
		switch {
		case e.confirmed:
			s.State, s.NextProbe = "dead", e.due
		case e.suspect:
			s.State, s.NextProbe = "suspect", e.due
		}
		for ns := range e.reporters {
			s.Reporters = append(s.Reporters, ns)
		}
		slices.Sort(s.Reporters)
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b Endpoint) int { return a.Endpoint.Compare(b.Endpoint) })
	return out
}

// Run probes what is due until ctx ends, then waits for its probes.
func (t *Tracker) Run(ctx context.Context) {
	var wg sync.WaitGroup
	defer wg.Wait()
	tick := time.NewTicker(t.cfg.Backoff.Min / 4)
	defer tick.Stop()
	prune := time.NewTicker(10 * time.Second)
	defer prune.Stop()
	for {
		t.schedule(ctx, &wg)
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		case <-prune.C:
			t.Prune()
		case <-t.wake:
		}
	}
}

func (t *Tracker) poke() {
	select {
	case t.wake <- struct{}{}:
	default:
	}
}

// schedule starts the probes that are due, one namespace after another.
func (t *Tracker) schedule(ctx context.Context, wg *sync.WaitGroup) {
	for {
		ep, owner, ok := t.take()
		if !ok {
			return
		}
		if !t.cfg.InUse(ep) {
			t.unclaim(ep, owner)
			t.forget(ep)
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			t.finish(ep, owner, t.cfg.Probe(ctx, ep))
		}()
	}
}

// take claims the next due probe, going round the namespaces so that each
// gets its turn. It returns false when none can start now.
func (t *Tracker) take() (netip.AddrPort, uint64, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.running >= t.cfg.Probes || len(t.owners) == 0 {
		return netip.AddrPort{}, 0, false
	}
	now := t.cfg.now()
	due := map[uint64][]netip.AddrPort{}
	for ep, e := range t.eps {
		if !e.probing && (e.suspect || e.confirmed) && !now.Before(e.due) {
			due[e.owner] = append(due[e.owner], ep)
		}
	}
	for i := range t.owners {
		j := (t.next + i) % len(t.owners)
		owner := t.owners[j]
		if len(due[owner]) == 0 || t.inFlight[owner] >= t.cfg.ProbesPerNamespace {
			continue
		}
		// The longest waiting first.
		ep := slices.MinFunc(due[owner], func(a, b netip.AddrPort) int { return t.eps[a].due.Compare(t.eps[b].due) })
		t.next = (j + 1) % len(t.owners)
		t.eps[ep].probing = true
		t.inFlight[owner]++
		t.running++
		return ep, owner, true
	}
	return netip.AddrPort{}, 0, false
}

// unclaim gives back a probe take claimed and did not start.
func (t *Tracker) unclaim(ep netip.AddrPort, owner uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.unclaimLocked(ep, owner)
}

func (t *Tracker) unclaimLocked(ep netip.AddrPort, owner uint64) *entry {
	t.inFlight[owner]--
	if t.inFlight[owner] <= 0 {
		delete(t.inFlight, owner)
	}
	t.running--
	e := t.eps[ep]
	if e != nil {
		e.probing = false
	}
	return e
}

// finish records a probe's result.
func (t *Tracker) finish(ep netip.AddrPort, owner uint64, err error) {
	var users []uint64
	if err != nil {
		users = t.users(ep)
	}
	t.mu.Lock()
	e := t.unclaimLocked(ep, owner)
	if e == nil {
		t.mu.Unlock()
		return
	}
	var changed, cleared bool
	if err != nil {
		changed = t.failedLocked(ep, e, err, users)
	} else {
		changed = t.succeededLocked(ep, e)
		cleared = changed
	}
	t.mu.Unlock()
	if changed {
		t.cfg.Changed(ep)
	}
	if cleared {
		t.cfg.Cleared(ep)
	}
	t.poke()
}

// failedLocked confirms ep dead and schedules its next probe; it returns
// whether ep was not confirmed before. users are the namespaces that
// choose from ep, if known.
func (t *Tracker) failedLocked(ep netip.AddrPort, e *entry, err error, users []uint64) bool {
	now := t.cfg.now()
	was := e.confirmed
	if !was {
		if len(users) > 0 {
			e.owner = t.leastLoaded(users)
			t.addOwner(e.owner)
			t.pruneOwners()
		}
		e.since = now
		t.log.Warn("endpoint confirmed dead by the daemon's own dial", "endpoint", ep, "err", err)
	}
	e.confirmed, e.suspect = true, false
	e.due = now.Add(e.b.Next())
	if err != nil {
		e.lastErr = err.Error()
	}
	return !was
}

// succeededLocked clears ep: the evidence held against it goes, and new
// evidence is probed only after the back-off, so that a namespace whose
// own connects fail (a firewall of its own) cannot make the daemon probe
// at its pace. It returns whether ep was confirmed dead before.
func (t *Tracker) succeededLocked(ep netip.AddrPort, e *entry) bool {
	now := t.cfg.now()
	was := e.confirmed
	if was {
		t.log.Info("endpoint reachable again", "endpoint", ep)
		e.b.Reset()
	}
	e.confirmed, e.suspect = false, false
	e.quiet = now.Add(e.b.Next())
	e.since = now
	e.lastErr = ""
	t.dropReporters(e)
	return was
}

func (t *Tracker) dropReporters(e *entry) {
	for ns := range e.reporters {
		if t.held[ns]--; t.held[ns] <= 0 {
			delete(t.held, ns)
		}
	}
	clear(e.reporters)
}

// forget drops ep: nothing chooses from it any more.
func (t *Tracker) forget(ep netip.AddrPort) {
	t.mu.Lock()
	e := t.eps[ep]
	if e == nil || e.probing {
		t.mu.Unlock()
		return
	}
	t.dropReporters(e)
	delete(t.eps, ep)
	t.pruneOwners()
	t.mu.Unlock()
	t.cfg.Cleared(ep)
}

// Prune forgets the endpoints a probe reached longer ago than the
// back-off's maximum, and those nothing uses any more; call it now and
// then.
func (t *Tracker) Prune() {
	t.mu.Lock()
	now := t.cfg.now()
	var idle []netip.AddrPort
	for ep, e := range t.eps {
		if !e.probing && !e.suspect && !e.confirmed && now.Sub(e.quiet) > t.cfg.Backoff.Max {
			delete(t.eps, ep)
		} else if !e.probing {
			idle = append(idle, ep)
		}
	}
	t.pruneOwners()
	t.mu.Unlock()
	for _, ep := range idle {
		if !t.cfg.InUse(ep) {
			t.forget(ep)
		}
	}
}

// leastLoaded returns the one of nss that owns the fewest endpoints.
func (t *Tracker) leastLoaded(nss []uint64) uint64 {
	owned := map[uint64]int{}
	for _, e := range t.eps {
		owned[e.owner]++
	}
	best := nss[0]
	for _, ns := range nss[1:] {
		if owned[ns] < owned[best] {
			best = ns
		}
	}
	return best
}

func (t *Tracker) addOwner(ns uint64) {
	if !slices.Contains(t.owners, ns) {
		t.owners = append(t.owners, ns)
	}
}

// pruneOwners drops the namespaces that own no entry from the rotation.
func (t *Tracker) pruneOwners() {
	owning := map[uint64]bool{}
	for _, e := range t.eps {
		owning[e.owner] = true
	}
	t.owners = slices.DeleteFunc(t.owners, func(ns uint64) bool { return !owning[ns] })
	if t.next >= len(t.owners) {
		t.next = 0
	}
}
