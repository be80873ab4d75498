package health

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/backoff"
	"github.com/connectable/connectable/internal/testenv"
)

var errDown = errors.New("connection refused")

func ep(i int) netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, 0, byte(i)}), 80)
}

// calls records the Tracker's callbacks.
type calls struct {
	mu               sync.Mutex
	changed, cleared map[netip.AddrPort]int
}

func newCalls() *calls {
	return &calls{changed: map[netip.AddrPort]int{}, cleared: map[netip.AddrPort]int{}}
}

func (c *calls) get(m map[netip.AddrPort]int, ap netip.AddrPort) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return m[ap]
}

// newTracker returns a Tracker on a test clock, with no goroutine: the
// tests drive take and finish themselves.
func newTracker(clock *testenv.Clock, c *calls, cfg Config) *Tracker {
	cfg.now = clock.Now
	cfg.Logger = slog.New(slog.DiscardHandler)
	cfg.Probe = func(context.Context, netip.AddrPort) error { panic("probes are driven by the test") }
	if cfg.Backoff.Min == 0 {
		cfg.Backoff = backoff.Backoff{Min: time.Second, Max: 8 * time.Second}
	}
	cfg.Changed = func(ap netip.AddrPort) { c.mu.Lock(); c.changed[ap]++; c.mu.Unlock() }
	cfg.Cleared = func(ap netip.AddrPort) { c.mu.Lock(); c.cleared[ap]++; c.mu.Unlock() }
	return New(cfg)
}

// A namespace's evidence is a suspicion until the daemon's own probe
// fails; a probe that reaches the endpoint keeps it in every table.
func TestPassiveEvidenceNeedsConfirmation(t *testing.T) {
	for _, tc := range []struct {
		name      string
		probe     error
		wantDead  bool
		wantState string
	}{
		{"probe fails", errDown, true, "dead"},
		{"probe reaches it", nil, false, "reachable"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clock, c := testenv.NewClock(), newCalls()
			tr := newTracker(clock, c, Config{})
			if !tr.Report(7, ep(1)) {
				t.Fatal("report refused")
			}
			if tr.Dead(ep(1)) {
				t.Fatal("dead on one namespace's word")
			}
			got, owner, ok := tr.take()
			if !ok || got != ep(1) || owner != 7 {
				t.Fatalf("take = %v %d %v; want a probe of %v for namespace 7 at once", got, owner, ok, ep(1))
			}
			tr.finish(got, owner, tc.probe)
			if tr.Dead(ep(1)) != tc.wantDead {
				t.Errorf("Dead = %v; want %v", !tc.wantDead, tc.wantDead)
			}
			if n := c.get(c.changed, ep(1)); n != map[bool]int{true: 1}[tc.wantDead] {
				t.Errorf("Changed called %d times", n)
			}
			if n := c.get(c.cleared, ep(1)); n != 0 {
				t.Errorf("Cleared called %d times; the namespace's own marks should lapse", n)
			}
			if s := tr.Snapshot(); len(s) != 1 || s[0].State != tc.wantState {
				t.Errorf("Snapshot = %+v; want %s", s, tc.wantState)
			}
		})
	}
}

// The relay's dial is the daemon's own: its failure confirms at once, its
// success revives and clears every namespace's marks.
func TestRelayDialConfirms(t *testing.T) {
	clock, c := testenv.NewClock(), newCalls()
	tr := newTracker(clock, c, Config{})
	tr.Failed(ep(1), errDown)
	if !tr.Dead(ep(1)) || c.get(c.changed, ep(1)) != 1 {
		t.Fatalf("a relay dial's failure did not confirm: dead %v, changed %d", tr.Dead(ep(1)), c.get(c.changed, ep(1)))
	}
	tr.Failed(ep(1), errDown)
	if c.get(c.changed, ep(1)) != 1 {
		t.Errorf("a second failure changed the tables again")
	}
	tr.Succeeded(ep(1))
	if tr.Dead(ep(1)) || c.get(c.changed, ep(1)) != 2 || c.get(c.cleared, ep(1)) != 1 {
		t.Errorf("after a relay dial's success: dead %v, changed %d, cleared %d; want alive, 2, 1",
			tr.Dead(ep(1)), c.get(c.changed, ep(1)), c.get(c.cleared, ep(1)))
	}
	tr.Succeeded(ep(2)) // never failed: nothing to do
	if c.get(c.changed, ep(2)) != 0 {
		t.Errorf("a success of an unknown endpoint changed the tables")
	}
}

// One namespace holds at most PerNamespace endpoints under suspicion; its
// further reports are dropped, another namespace's are not.
func TestPerNamespaceBound(t *testing.T) {
	clock, c := testenv.NewClock(), newCalls()
	tr := newTracker(clock, c, Config{PerNamespace: 3})
	var accepted []bool
	for i := range 5 {
		accepted = append(accepted, tr.Report(1, ep(i)))
	}
	if fmt.Sprint(accepted) != "[true true true false false]" {
		t.Errorf("reports of namespace 1 accepted: %v; want the first 3", accepted)
	}
	if !tr.Report(1, ep(0)) {
		t.Errorf("a repeated report of a held endpoint was refused")
	}
	if !tr.Report(2, ep(4)) || !tr.Report(2, ep(0)) {
		t.Errorf("namespace 2's reports refused while namespace 1 is at its bound")
	}
	if d := tr.Dropped(); d != 2 {
		t.Errorf("Dropped = %d; want 2", d)
	}
	// A probe reaching ep(0) frees namespace 1's place.
	for {
		got, owner, ok := tr.take()
		if !ok {
			break
		}
		tr.finish(got, owner, map[bool]error{true: nil, false: errDown}[got == ep(0)])
	}
	if !tr.Report(1, ep(3)) {
		t.Errorf("namespace 1 still at its bound after a probe cleared one of its endpoints")
	}
}

// Probes go round the namespaces: one namespace's many dead endpoints take
// at most ProbesPerNamespace of the probes, and every other namespace's
// turn comes next.
func TestProbesRoundRobin(t *testing.T) {
	clock, c := testenv.NewClock(), newCalls()
	tr := newTracker(clock, c, Config{Probes: 4, ProbesPerNamespace: 2, PerNamespace: 100})
	for i := range 50 {
		tr.Report(1, ep(i))
	}
	tr.Report(2, ep(100))
	tr.Report(3, ep(101))
	var order []uint64
	for {
		_, owner, ok := tr.take()
		if !ok {
			break
		}
		order = append(order, owner)
	}
	if fmt.Sprint(order) != "[1 2 3 1]" {
		t.Errorf("probes started for namespaces %v; want [1 2 3 1]: each its turn, namespace 1 at most 2", order)
	}
}

// A dead endpoint is probed on the back-off's schedule: Min after the
// first failure, doubling to Max; passive evidence against one a probe
// just reached waits for the back-off too.
func TestProbeSchedule(t *testing.T) {
	clock, c := testenv.NewClock(), newCalls()
	tr := newTracker(clock, c, Config{Backoff: backoff.Backoff{Min: time.Second, Max: 4 * time.Second}})
	tr.Report(1, ep(1))
	steps := []struct {
		advance time.Duration
		due     bool
		result  error
	}{
		{0, true, errDown},                      // confirmed; next in 1s
		{900 * time.Millisecond, false, nil},    //
		{100 * time.Millisecond, true, errDown}, // next in 2s
		{1900 * time.Millisecond, false, nil},   //
		{100 * time.Millisecond, true, errDown}, // next in 4s
		{4 * time.Second, true, errDown},        // at Max
		{4 * time.Second, true, nil},            // back; quiet for 1s
		{0, false, nil},                         // nothing reported
	}
	for i, s := range steps {
		clock.Advance(s.advance)
		got, owner, ok := tr.take()
		if ok != s.due {
			t.Fatalf("step %d: probe due %v; want %v", i, ok, s.due)
		}
		if ok {
			tr.finish(got, owner, s.result)
		}
	}
	if tr.Dead(ep(1)) {
		t.Fatal("dead after the probe reached it")
	}
	// New evidence right after a successful probe waits for the back-off.
	tr.Report(1, ep(1))
	if _, _, ok := tr.take(); ok {
		t.Errorf("evidence probed again at once after a probe reached the endpoint")
	}
}

// An endpoint nothing chooses from any more is forgotten, not probed.
func TestUnusedForgotten(t *testing.T) {
	clock, c := testenv.NewClock(), newCalls()
	var probed int
	cfg := Config{InUse: func(netip.AddrPort) bool { return false }}
	tr := newTracker(clock, c, cfg)
	tr.cfg.Probe = func(context.Context, netip.AddrPort) error { probed++; return nil }
	tr.Report(1, ep(1))
	var wg sync.WaitGroup
	tr.schedule(context.Background(), &wg)
	wg.Wait()
	if probed != 0 || len(tr.Snapshot()) != 0 || c.get(c.cleared, ep(1)) != 1 {
		t.Errorf("unused endpoint: probed %d times, snapshot %+v, cleared %d; want forgotten and its marks cleared",
			probed, tr.Snapshot(), c.get(c.cleared, ep(1)))
	}
}

// Run probes reported endpoints from its own goroutines and returns only
// once they are done; a slow probe of one namespace does not hold up
// another's.
func TestRunProbes(t *testing.T) {
	release := make(chan struct{})
	var mu sync.Mutex
	probed := map[netip.AddrPort]bool{}
	tr := New(Config{
		Logger:             slog.New(slog.DiscardHandler),
		Backoff:            backoff.Backoff{Min: 20 * time.Millisecond, Max: 100 * time.Millisecond},
		ProbesPerNamespace: 1,
		Probe: func(ctx context.Context, ap netip.AddrPort) error {
			if ap.Addr() == ep(1).Addr() {
				select { // namespace 1's probe hangs
				case <-release:
				case <-ctx.Done():
				}
			}
			mu.Lock()
			probed[ap] = true
			mu.Unlock()
			return errDown
		},
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		tr.Run(ctx)
	}()
	tr.Report(1, ep(1))
	tr.Report(1, ep(3))
	tr.Report(2, ep(2))
	deadline := time.Now().Add(10 * time.Second)
	for !tr.Dead(ep(2)) {
		if time.Now().After(deadline) {
			t.Fatal("namespace 2's endpoint never probed while namespace 1's probe hangs")
		}
		time.Sleep(5 * time.Millisecond)
	}
	mu.Lock()
	if probed[ep(3)] {
		t.Errorf("namespace 1 had two probes at once")
	}
	mu.Unlock()
	close(release)
	cancel()
	<-done
}

// An endpoint confirmed dead is probed on the turn of the least loaded
// namespace that uses it: namespace 1, with many dead endpoints of its own,
// reported first the one namespace 2 also uses, yet namespace 2's turn
// revives it.
func TestConfirmedOwnedByLeastLoaded(t *testing.T) {
	clock, c := testenv.NewClock(), newCalls()
	shared := ep(200)
	tr := newTracker(clock, c, Config{Probes: 1, ProbesPerNamespace: 1, PerNamespace: 100,
		Users: func(ap netip.AddrPort) []uint64 {
			if ap == shared {
				return []uint64{1, 2}
			}
			return []uint64{1}
		}})
	tr.Report(1, shared)
	for i := range 20 {
		tr.Report(1, ep(i))
	}
	// Every probe fails: all confirmed dead.
	for {
		got, owner, ok := tr.take()
		if !ok {
			break
		}
		tr.finish(got, owner, errDown)
	}
	if !tr.Dead(shared) {
		t.Fatal("the shared endpoint is not confirmed dead")
	}
	clock.Advance(time.Second)
	// One probe at a time: namespace 1's turn, then namespace 2's.
	var first []netip.AddrPort
	for range 2 {
		got, owner, ok := tr.take()
		if !ok {
			t.Fatal("no probe due")
		}
		first = append(first, got)
		tr.finish(got, owner, errDown)
	}
	if !slices.Contains(first, shared) {
		t.Errorf("the first two revival probes went to %v; want the shared endpoint among them, on namespace 2's turn", first)
	}
}
