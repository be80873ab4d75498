// Package reconcile owns the gap between what connectable wants and what it
// has: for every network namespace, the desired state (handed over whole by
// the Docker watcher), the state last applied, the error of the last
// attempt, and the one worker goroutine that closes the gap. It drives the
// data paths through Path, which it declares: the relay (*proxy.Server) and,
// over it, the socket path (*sockpath.Path).
//
// Properties the rest of the daemon relies on:
//   - Desire never blocks on a set-up: it records the new state and wakes or
//     starts the namespace's worker.
//   - One namespace never waits for another: each has its own worker; calls
//     for one key never overlap.
//   - A burst of changes while a slow set-up runs costs one more call, with
//     the latest state, not one per change.
//   - A failed set-up or removal is retried, with back-off, until it
//     succeeds or the state it was for is no longer wanted.
//   - Once told the desired state is the whole truth (Full), Settled is
//     closed when every namespace then desired has been set up or has
//     failed once: the time to remove what a previous run left behind.
//
// Typical usage:
//
//	rec := reconcile.New(reconcile.Config{Paths: []reconcile.Path{srv}, Logger: log})
//	defer rec.Close()
//	w := docker.NewWatcher(docker.Config{Sink: rec, ...})
package reconcile

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/connectable/connectable/internal/backoff"
	"github.com/connectable/connectable/netns"
)

// Namespace is the desired state of one network namespace.
type Namespace struct {
	Key  string // ID of the container owning the namespace
	Path string // where it was opened, e.g. /proc/<pid>/ns/net; entered only if NetNS is nil
	// NetNS is the namespace, opened once when its container was seen: the
	// paths get its Name and never Path, which a reused PID would point
	// at another namespace. The Reconciler holds its own references (see
	// Desire). The watcher always sets it; nil (tests) means Path.
	NetNS      *netns.Handle
	Containers []Container       // running containers in it, owner first
	Routes     map[uint16]string // port → service; never empty, never modified once handed over
}

// target is what the paths are given to enter ns by.
func (ns *Namespace) target() string {
	if ns.NetNS != nil {
		return ns.NetNS.Name()
	}
	return ns.Path
}

// Container names one container of a Namespace.
type Container struct {
	ID   string // short (12 hex digits)
	Name string // without the leading slash
}

// Path is one data path: a mechanism that makes a namespace's labelled
// ports reach their services.
type Path interface {
	// Apply makes the namespace netns (a path or a netns.Handle's name),
	// known by key, route each port to its service. A Path that keeps
	// using the namespace after Apply returns takes its own reference
	// (netns.Hold): the Reconciler's ends with the key's next successful
	// Apply or Remove. It must be idempotent: it is called again with the same
	// state after it failed, and after a restart finds its own leftovers.
	Apply(ctx context.Context, key, netns string, routes map[uint16]string) error
	// Remove forgets the namespace key; its namespace may be gone already.
	Remove(ctx context.Context, key string) error
}

// Config configures a Reconciler. Paths is required.
type Config struct {
	// Paths are applied in order and removed in reverse order. List the
	// fastest first (the socket path), so that a new container is served
	// as early as possible, and the net beneath it after (the relay, which
	// serves every label).
	Paths []Path
	// RetryMin and RetryMax optionally bound the back-off between attempts
	// of a failing set-up; if zero, 1s and 30s.
	RetryMin, RetryMax time.Duration
	// Logger optionally receives the reconciler's logs; if nil,
	// slog.Default().
	Logger *slog.Logger
}

const (
	defaultRetryMin = time.Second
	defaultRetryMax = 30 * time.Second
)

// Reconciler applies the desired state of every namespace. Create it with
// New; its methods may be called from any goroutine.
type Reconciler struct {
	cfg    Config
	log    *slog.Logger
	ctx    context.Context // parents every set-up; Close cancels it
	cancel context.CancelFunc
	setups histogram

	mu      sync.Mutex
	closed  bool
	desired []Namespace // sorted by key, as last handed over
	keys    map[string]*keyState
	workers sync.WaitGroup
	// full is set by Full; unsettled are the keys desired then whose
	// first attempt since has not completed; settled is closed when none
	// is left.
	full      bool
	unsettled map[string]bool
	settled   chan struct{}
	waits     waiters // for WaitApplied (wait.go)
}

// keyState is one namespace's delivery. At most one worker runs per key.
type keyState struct {
	want     *Namespace    // desired now; nil: to be removed
	sent     *Namespace    // handed to the paths last (maybe still in flight)
	err      error         // result of the last completed attempt
	pending  bool          // want differs from what was last done successfully
	running  bool          // a worker owns this key
	inflight bool          // an attempt with sent runs now
	wake     chan struct{} // pokes a worker waiting out its back-off
	setup    time.Duration // duration of the last successful Apply
	// held are the handles handed to the paths and not yet superseded by
	// a successful attempt: one reference each, so that a path's teardown
	// of the namespace it was given (on a failure, or on the next Apply)
	// enters that namespace, not whatever its old path names now.
	held map[*netns.Handle]bool
}

// New returns a Reconciler for cfg with nothing desired yet.
func New(cfg Config) *Reconciler {
	if cfg.RetryMin <= 0 {
		cfg.RetryMin = defaultRetryMin
	}
	if cfg.RetryMax < cfg.RetryMin {
		cfg.RetryMax = max(defaultRetryMax, cfg.RetryMin)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	r := &Reconciler{cfg: cfg, log: log.With("component", "reconcile"), keys: make(map[string]*keyState), settled: make(chan struct{})}
	r.ctx, r.cancel = context.WithCancel(context.Background())
	return r
}

// Desire replaces the whole desired state: every namespace in ns is to be
// set up as it says, every other one known so far is to be removed. ns must
// have distinct keys and is not modified; Desire keeps it. Desire takes a
// reference to each namespace's NetNS before it returns, so the caller may
// release its own at once; a namespace whose NetNS is released already is
// left out.
func (r *Reconciler) Desire(ns []Namespace) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return
	}
	sorted := make([]Namespace, 0, len(ns))
	for _, n := range ns {
		if n.NetNS != nil && !n.NetNS.Acquire() {
			r.log.Warn("namespace handle closed before its set-up, skipping it", "key", short(n.Key), "netns", n.Path)
			continue
		}
		sorted = append(sorted, n)
	}
	slices.SortFunc(sorted, func(a, b Namespace) int { return strings.Compare(a.Key, b.Key) })
	releaseAll(r.desired)
	r.desired = sorted
	seen := make(map[string]bool, len(sorted))
	for i := range sorted {
		seen[sorted[i].Key] = true
		r.wantLocked(sorted[i].Key, &sorted[i])
	}
	for key := range r.keys {
		if !seen[key] {
			r.wantLocked(key, nil)
		}
	}
	for key := range r.unsettled {
		if !seen[key] {
			r.settleLocked(key) // no longer wanted: nothing to wait for
		}
	}
}

// Full tells the Reconciler that the desired state it holds (the last
// handed to Desire, or none) is the whole truth, as a full listing of the
// engine's containers gives it. The first call starts Settled's wait; later
// ones do nothing.
func (r *Reconciler) Full() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.full {
		return
	}
	r.full = true
	r.unsettled = make(map[string]bool, len(r.desired))
	for _, ns := range r.desired {
		if ks := r.keys[ns.Key]; ks != nil && !ks.settledLocked() {
			r.unsettled[ns.Key] = true
		}
	}
	if len(r.unsettled) == 0 {
		close(r.settled)
	}
}

// Settled returns a channel closed once Full was called and every
// namespace desired at that time has been set up, or has failed once (it
// is retried meanwhile), or is no longer desired. It is never closed
// without Full.
func (r *Reconciler) Settled() <-chan struct{} { return r.settled }

// settledLocked reports whether the key's desired state was attempted:
// applied, or failed once (it is retried meanwhile). r.mu is held.
func (ks *keyState) settledLocked() bool {
	return ks.err != nil || (!ks.pending && !ks.inflight && same(ks.sent, ks.want))
}

// settleLocked records that key needs no more waiting for. r.mu is held.
func (r *Reconciler) settleLocked(key string) {
	if !r.unsettled[key] {
		return
	}
	delete(r.unsettled, key)
	if len(r.unsettled) == 0 {
		close(r.settled)
	}
}

func same(a, b *Namespace) bool {
	if a == nil || b == nil {
		return a == b
	}
	return a.NetNS == b.NetNS && a.Path == b.Path && maps.Equal(a.Routes, b.Routes)
}

// releaseAll drops the references Desire took for ns.
func releaseAll(ns []Namespace) {
	for _, n := range ns {
		if n.NetNS != nil {
			n.NetNS.Release()
		}
	}
}

// hold takes the key's own reference to the handle about to be handed to
// the paths; r.mu is held, and want is in r.desired, whose reference keeps
// the handle open meanwhile.
func (ks *keyState) hold(want *Namespace) {
	if want == nil || want.NetNS == nil || ks.held[want.NetNS] {
		return
	}
	if !want.NetNS.Acquire() {
		// Only a caller releasing a reference it did not take gets here;
		// the attempt then fails with netns.ErrClosed, and says so.
		return
	}
	if ks.held == nil {
		ks.held = make(map[*netns.Handle]bool)
	}
	ks.held[want.NetNS] = true
}

// releaseHeld drops the key's references to every handle but keep.
func (ks *keyState) releaseHeld(keep *netns.Handle) {
	for h := range ks.held {
		if h != keep {
			h.Release()
			delete(ks.held, h)
		}
	}
}

// wantLocked records ns as key's desired state and makes sure a worker
// delivers it if it differs from what was delivered. r.mu is held.
func (r *Reconciler) wantLocked(key string, ns *Namespace) {
	ks := r.keys[key]
	if ks == nil {
		if ns == nil {
			return // never set up: nothing to remove
		}
		ks = &keyState{wake: make(chan struct{}, 1)}
		r.keys[key] = ks
	}
	changed := !same(ns, ks.want)
	ks.want = ns
	if !changed && !ks.pending {
		return
	}
	ks.pending = !same(ns, ks.sent) || ks.err != nil
	switch {
	case ks.running:
		select {
		case ks.wake <- struct{}{}:
		default:
		}
	case ks.pending:
		ks.running = true
		r.workers.Add(1)
		go r.deliver(key, ks)
	case ks.want == nil && ks.sent == nil:
		delete(r.keys, key)
	}
}

// deliver runs one key's attempts until its desired state is in place (or
// removed), then exits. Failures are retried after a back-off that a new
// desired state cuts short.
func (r *Reconciler) deliver(key string, ks *keyState) {
	defer r.workers.Done()
	retry := backoff.Backoff{Min: r.cfg.RetryMin, Max: r.cfg.RetryMax}
	for {
		r.mu.Lock()
		if !ks.pending || r.ctx.Err() != nil {
			ks.running = false
			if ks.want == nil && ks.sent == nil {
				delete(r.keys, key)
			}
			r.mu.Unlock()
			return
		}
		want := ks.want
		ks.pending, ks.sent, ks.inflight = false, want, true
		ks.hold(want)
		r.mu.Unlock()

		start := time.Now()
		err := r.attempt(key, want)
		took := time.Since(start)
		if want != nil && err == nil {
			r.setups.observe(took)
		}

		r.mu.Lock()
		ks.err, ks.inflight = err, false
		r.waits.attemptDone(key, want, err)
		if want != nil {
			r.settleLocked(key) // set up, or failed once
		}
		if err == nil {
			if want == nil {
				ks.sent = nil
				ks.releaseHeld(nil)
			} else {
				ks.setup = took
				ks.releaseHeld(want.NetNS)
			}
			retry.Reset()
			r.mu.Unlock()
			r.logDone(key, want, took)
			continue
		}
		if r.ctx.Err() != nil {
			r.mu.Unlock()
			continue
		}
		// Retry the latest state, whatever it is by then.
		ks.pending = true
		wait := retry.Next()
		r.mu.Unlock()
		r.logFailure(key, want, err, wait)
		r.sleep(ks, wait)
	}
}

// attempt applies want through every path, or removes key from every path
// when want is nil.
func (r *Reconciler) attempt(key string, want *Namespace) error {
	if want == nil {
		var errs []error
		for _, p := range slices.Backward(r.cfg.Paths) {
			if err := p.Remove(r.ctx, key); err != nil {
				errs = append(errs, err)
			}
		}
		return errors.Join(errs...)
	}
	for _, p := range r.cfg.Paths {
		if err := p.Apply(r.ctx, key, want.target(), want.Routes); err != nil {
			return err
		}
	}
	return nil
}

func (r *Reconciler) sleep(ks *keyState, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ks.wake:
	case <-r.ctx.Done():
	}
}

func (r *Reconciler) logDone(key string, want *Namespace, took time.Duration) {
	if want == nil {
		r.log.Debug("namespace removed", "key", short(key))
		return
	}
	r.log.Debug("namespace set up", "key", short(key), "netns", want.Path, "routes", len(want.Routes), "took", took)
}

func (r *Reconciler) logFailure(key string, want *Namespace, err error, retry time.Duration) {
	if want == nil {
		r.log.Error("removing namespace; retrying", "key", short(key), "err", err, "in", retry)
		return
	}
	r.log.Error("setting up namespace; retrying", "key", short(key), "netns", want.Path, "err", err, "in", retry)
}

// Status is one namespace's desired state and how its delivery went.
type Status struct {
	Namespace
	// Err is the last attempt's error, "" once an attempt succeeded.
	Err string
	// Applied reports whether the desired state is in place.
	Applied bool
	// Setup is how long the last successful set-up took.
	Setup time.Duration
}

// Status returns every desired namespace, sorted by key, with its delivery
// state. It never waits for a set-up.
func (r *Reconciler) Status() []Status {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]Status, 0, len(r.desired))
	for _, ns := range r.desired {
		st := Status{Namespace: ns}
		st.Containers = slices.Clone(ns.Containers)
		st.Routes = maps.Clone(ns.Routes)
		if ks := r.keys[ns.Key]; ks != nil {
			if ks.err != nil {
				st.Err = ks.err.Error()
			}
			st.Applied = ks.err == nil && !ks.pending && !ks.inflight && same(ks.sent, ks.want)
			st.Setup = ks.setup
		}
		out = append(out, st)
	}
	return out
}

// SetupTimes returns the distribution of successful set-up durations since
// New.
func (r *Reconciler) SetupTimes() Histogram { return r.setups.snapshot() }

// Close cancels the set-ups in flight, waits for every worker and makes
// later calls to Desire do nothing. It leaves applied state in place:
// tearing down is each path's own Close, which holds its own references to
// the namespaces it set up; Close releases the Reconciler's.
func (r *Reconciler) Close() {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return
	}
	r.closed = true
	r.mu.Unlock()
	r.cancel()
	r.workers.Wait()
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, ks := range r.keys {
		ks.releaseHeld(nil)
	}
	releaseAll(r.desired)
	r.desired = nil
}

// Histogram is a cumulative distribution of durations, in seconds.
type Histogram struct {
	// Bounds are the buckets' upper bounds; Counts[i] counts observations
	// ≤ Bounds[i] (cumulative, as Prometheus reports them).
	Bounds []float64
	Counts []uint64
	Count  uint64
	Sum    float64
}

// setupBounds reach from the few milliseconds a namespace takes to the
// timeouts a stuck one hits.
var setupBounds = []float64{.002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10}

type histogram struct {
	mu     sync.Mutex
	counts [13]uint64 // per bucket, the last for +Inf
	sum    float64
}

func (h *histogram) observe(d time.Duration) {
	s := d.Seconds()
	i, _ := slices.BinarySearch(setupBounds, s)
	h.mu.Lock()
	h.counts[i]++
	h.sum += s
	h.mu.Unlock()
}

func (h *histogram) snapshot() Histogram {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := Histogram{Bounds: slices.Clone(setupBounds), Counts: make([]uint64, len(setupBounds)), Sum: h.sum}
	for i, n := range h.counts {
		out.Count += n
		if i < len(out.Counts) {
			out.Counts[i] = out.Count
		}
	}
	return out
}

func short(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

// String is a Namespace for logs and test failures.
func (ns Namespace) String() string {
	return fmt.Sprintf("%s %s %v", short(ns.Key), ns.Path, ns.Routes)
}
