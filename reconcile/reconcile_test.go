package reconcile

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
)

// recPath is a Path that records its calls and can block or fail them.
type recPath struct {
	name  string
	trace *[]string // shared by the paths of one test, under mu
	mu    *sync.Mutex
	state map[string]map[uint16]string // applied now

	block func(op, key string) <-chan struct{} // nil channel: no wait
	fail  func(op, key string, routes map[uint16]string) error
}

func newPaths(names ...string) []*recPath {
	var trace []string
	mu := new(sync.Mutex)
	var ps []*recPath
	for _, n := range names {
		ps = append(ps, &recPath{name: n, trace: &trace, mu: mu, state: map[string]map[uint16]string{}})
	}
	return ps
}

func (p *recPath) call(ctx context.Context, op, key string, routes map[uint16]string) error {
	p.mu.Lock()
	*p.trace = append(*p.trace, fmt.Sprintf("%s.%s(%s)", p.name, op, key))
	block, fail := p.block, p.fail
	p.mu.Unlock()
	if block != nil {
		if ch := block(op, key); ch != nil {
			select {
			case <-ch:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	}
	if fail != nil {
		if err := fail(op, key, routes); err != nil {
			return err
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if op == "remove" {
		delete(p.state, key)
	} else {
		p.state[key] = routes
	}
	return nil
}

func (p *recPath) Apply(ctx context.Context, key, _ string, routes map[uint16]string) error {
	return p.call(ctx, "apply", key, routes)
}

func (p *recPath) Remove(ctx context.Context, key string) error {
	return p.call(ctx, "remove", key, nil)
}

func (p *recPath) applied(key string) (map[uint16]string, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	r, ok := p.state[key]
	return r, ok
}

func (p *recPath) calls() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), *p.trace...)
}

func (p *recPath) count(call string) int {
	n := 0
	for _, c := range p.calls() {
		if c == call {
			n++
		}
	}
	return n
}

func newReconciler(t *testing.T, paths ...*recPath) (*Reconciler, *testenv.SyncBuffer) {
	t.Helper()
	var logs testenv.SyncBuffer
	var ps []Path
	for _, p := range paths {
		ps = append(ps, p)
	}
	r := New(Config{Paths: ps, RetryMin: 10 * time.Millisecond, RetryMax: 40 * time.Millisecond,
		Logger: testenv.Logger(t, &logs)})
	t.Cleanup(r.Close)
	return r, &logs
}

func ns(key string, routes map[uint16]string) Namespace {
	return Namespace{Key: key, Path: "/proc/1/ns/net-" + key, Routes: routes}
}

func waitFor(t *testing.T, what string, cond func() bool, calls func() []string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s; calls: %v", what, calls())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestApplyThenRemoveInPathOrder(t *testing.T) {
	testenv.CheckGoroutines(t)
	ps := newPaths("socket", "relay")
	r, _ := newReconciler(t, ps...)
	routes := map[uint16]string{6000: "a"}
	r.Desire([]Namespace{ns("k", routes)})
	waitFor(t, "applied", func() bool { _, ok := ps[1].applied("k"); return ok }, ps[0].calls)
	waitFor(t, "status applied", func() bool { st := r.Status(); return len(st) == 1 && st[0].Applied }, ps[0].calls)
	r.Desire(nil)
	waitFor(t, "removed", func() bool { _, ok := ps[0].applied("k"); return !ok }, ps[0].calls)
	want := []string{"socket.apply(k)", "relay.apply(k)", "relay.remove(k)", "socket.remove(k)"}
	if got := ps[0].calls(); strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("calls = %v; want %v (first path applied first, removed last)", got, want)
	}
	if st := r.Status(); len(st) != 0 {
		t.Errorf("Status() = %+v after removal; want none", st)
	}
	if h := r.SetupTimes(); h.Count != 1 || h.Counts[len(h.Counts)-1] > h.Count {
		t.Errorf("SetupTimes() = %+v; want one observation", h)
	}
}

func TestUnchangedStateIsNotAppliedAgain(t *testing.T) {
	testenv.CheckGoroutines(t)
	ps := newPaths("relay")
	r, _ := newReconciler(t, ps...)
	want := ns("k", map[uint16]string{6000: "a"})
	r.Desire([]Namespace{want})
	waitFor(t, "applied", func() bool { _, ok := ps[0].applied("k"); return ok }, ps[0].calls)
	// A new slice with the same content, members aside, changes nothing.
	again := want
	again.Routes = maps.Clone(want.Routes)
	again.Containers = []Container{{ID: "x", Name: "late"}}
	r.Desire([]Namespace{again})
	r.Desire([]Namespace{again})
	time.Sleep(50 * time.Millisecond)
	if n := ps[0].count("relay.apply(k)"); n != 1 {
		t.Errorf("applied %d times; want once: %v", n, ps[0].calls())
	}
	if st := r.Status(); len(st) != 1 || len(st[0].Containers) != 1 || st[0].Containers[0].Name != "late" {
		t.Errorf("Status() = %+v; want the latest members", st)
	}
}

// TestSlowNamespaceDoesNotBlockOthers: while one namespace's set-up hangs,
// another is set up and removed, Status answers, and the hung one's burst of
// changes costs one more call, with the latest state.
func TestSlowNamespaceDoesNotBlockOthers(t *testing.T) {
	testenv.CheckGoroutines(t)
	ps := newPaths("relay")
	release := make(chan struct{})
	var slowCalls atomic.Int32
	ps[0].block = func(op, key string) <-chan struct{} {
		if key == "slow" {
			slowCalls.Add(1)
			return release
		}
		return nil
	}
	r, _ := newReconciler(t, ps...)
	slow := ns("slow", map[uint16]string{6000: "v0"})
	r.Desire([]Namespace{slow})
	waitFor(t, "slow apply started", func() bool { return slowCalls.Load() == 1 }, ps[0].calls)

	fast := ns("fast", map[uint16]string{6000: "f"})
	for i := 1; i <= 3; i++ {
		slow = ns("slow", map[uint16]string{6000: fmt.Sprintf("v%d", i)})
		r.Desire([]Namespace{slow, fast})
	}
	waitFor(t, "fast applied", func() bool { _, ok := ps[0].applied("fast"); return ok }, ps[0].calls)
	done := make(chan []Status)
	go func() { done <- r.Status() }()
	select {
	case st := <-done:
		if len(st) != 2 || st[1].Key != "slow" || st[1].Applied {
			t.Errorf("Status() = %+v; want fast applied and slow not yet", st)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("Status() waited for a set-up")
	}
	r.Desire([]Namespace{slow})
	waitFor(t, "fast removed", func() bool { _, ok := ps[0].applied("fast"); return !ok }, ps[0].calls)

	close(release)
	waitFor(t, "slow at its latest", func() bool {
		got, ok := ps[0].applied("slow")
		return ok && got[6000] == "v3"
	}, ps[0].calls)
	if n := slowCalls.Load(); n != 2 {
		t.Errorf("slow got %d calls; want 2 (the first, then the latest state): %v", n, ps[0].calls())
	}
}

func TestFailedSetUpRetriedWithBackoff(t *testing.T) {
	testenv.CheckGoroutines(t)
	ps := newPaths("relay")
	var failures atomic.Int32
	failures.Store(3)
	ps[0].fail = func(op, key string, _ map[uint16]string) error {
		if failures.Add(-1) >= 0 {
			return errors.New("injected failure")
		}
		return nil
	}
	r, logs := newReconciler(t, ps...)
	r.Desire([]Namespace{ns("k", map[uint16]string{6000: "a"})})
	waitFor(t, "error shown", func() bool {
		st := r.Status()
		return len(st) == 1 && strings.Contains(st[0].Err, "injected failure") && !st[0].Applied
	}, ps[0].calls)
	waitFor(t, "applied", func() bool { st := r.Status(); return len(st) == 1 && st[0].Applied && st[0].Err == "" }, ps[0].calls)
	if n := ps[0].count("relay.apply(k)"); n != 4 {
		t.Errorf("%d attempts; want 4 (three failures, one success): %v", n, ps[0].calls())
	}
	if n := strings.Count(logs.String(), "setting up namespace; retrying"); n != 3 {
		t.Errorf("logged %d failures; want 3:\n%s", n, logs)
	}

	// A removal that fails is retried too.
	failures.Store(1)
	r.Desire(nil)
	waitFor(t, "removed", func() bool { _, ok := ps[0].applied("k"); return !ok }, ps[0].calls)
	if n := ps[0].count("relay.remove(k)"); n != 2 {
		t.Errorf("%d removal attempts; want 2: %v", n, ps[0].calls())
	}
}

// TestNewStateCutsBackoffShort: a failing namespace whose desired state
// changes is tried with the new state at once, not after its back-off.
func TestNewStateCutsBackoffShort(t *testing.T) {
	testenv.CheckGoroutines(t)
	ps := newPaths("relay")
	ps[0].fail = func(op, key string, routes map[uint16]string) error {
		if routes[6000] == "bad" {
			return errors.New("injected failure")
		}
		return nil
	}
	r := New(Config{Paths: []Path{ps[0]}, RetryMin: time.Hour, Logger: slog.New(slog.DiscardHandler)})
	t.Cleanup(r.Close)
	r.Desire([]Namespace{ns("k", map[uint16]string{6000: "bad"})})
	waitFor(t, "failed once", func() bool { st := r.Status(); return len(st) == 1 && st[0].Err != "" }, ps[0].calls)
	r.Desire([]Namespace{ns("k", map[uint16]string{6000: "good"})})
	waitFor(t, "applied the new state", func() bool {
		got, ok := ps[0].applied("k")
		return ok && got[6000] == "good"
	}, ps[0].calls)
}

func TestCloseCancelsSetUpInFlight(t *testing.T) {
	testenv.CheckGoroutines(t)
	ps := newPaths("relay")
	started := make(chan struct{})
	ps[0].block = func(op, key string) <-chan struct{} {
		close(started)
		return make(chan struct{}) // never released: only ctx ends it
	}
	r, _ := newReconciler(t, ps...)
	r.Desire([]Namespace{ns("k", map[uint16]string{6000: "a"})})
	<-started
	closed := make(chan struct{})
	go func() { r.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not cancel the set-up in flight")
	}
	r.Desire([]Namespace{ns("other", map[uint16]string{6000: "a"})})
	time.Sleep(20 * time.Millisecond)
	if n := len(ps[0].calls()); n != 1 {
		t.Errorf("calls after Close: %v", ps[0].calls())
	}
}
