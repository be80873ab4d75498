package reconcile

import (
	"context"
	"errors"
	"fmt"

	"github.com/connectable/connectable/netns"
)

// waiters tracks, per key, the state its last successful attempt put in
// place, and wakes WaitApplied callers after every attempt. Its fields are
// guarded by the Reconciler's mu.
type waiters struct {
	applied map[string]*Namespace // nil entry: not applied (or removed)
	changed chan struct{}         // closed and replaced after every attempt
}

// attemptDone records the outcome of an attempt for key; r.mu is held.
func (w *waiters) attemptDone(key string, want *Namespace, err error) {
	if w.applied == nil {
		w.applied = make(map[string]*Namespace)
	}
	switch {
	case err != nil:
		// What was applied before may be half replaced: not applied.
		delete(w.applied, key)
	case want == nil:
		delete(w.applied, key)
	default:
		w.applied[key] = want
	}
	if w.changed != nil {
		close(w.changed)
		w.changed = nil
	}
}

// wait returns a channel closed after the next attempt; r.mu is held.
func (w *waiters) wait() <-chan struct{} {
	if w.changed == nil {
		w.changed = make(chan struct{})
	}
	return w.changed
}

// ErrNotWanted is returned by WaitApplied when the namespace is no longer
// desired as asked (its container went, or the key now names another
// namespace).
var ErrNotWanted = errors.New("namespace no longer desired")

// WaitApplied waits until every path has applied the desired state of key,
// and that state is still the one desired and in the namespace h: the OCI
// hook's "serve this container before its process runs". It returns
// ErrNotWanted at once when key is not desired in h, and ctx's error, with
// the last attempt's error, when ctx ends first. It never starts a set-up:
// Desire has done that.
func (r *Reconciler) WaitApplied(ctx context.Context, key string, h *netns.Handle) error {
	for {
		r.mu.Lock()
		ks := r.keys[key]
		if r.closed || ks == nil || ks.want == nil || (h != nil && ks.want.NetNS != h) {
			r.mu.Unlock()
			return fmt.Errorf("waiting for %s: %w", short(key), ErrNotWanted)
		}
		if a := r.waits.applied[key]; a != nil && !ks.pending && same(a, ks.want) {
			r.mu.Unlock()
			return nil
		}
		lastErr := ks.err
		ch := r.waits.wait()
		r.mu.Unlock()
		select {
		case <-ch:
		case <-r.ctx.Done():
			return fmt.Errorf("waiting for %s: %w", short(key), r.ctx.Err())
		case <-ctx.Done():
			if lastErr != nil {
				return fmt.Errorf("waiting for %s: %w (last attempt: %v)", short(key), ctx.Err(), lastErr)
			}
			return fmt.Errorf("waiting for %s: %w", short(key), ctx.Err())
		}
	}
}
