package reconcile

import (
	"errors"
	"testing"
	"time"
)

func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// TestSettled: Settled waits for Full, then for every namespace desired
// then to be set up or to fail once, and not for a namespace desired later.
func TestSettled(t *testing.T) {
	p := newPaths("relay")[0]
	release := make(chan struct{})
	p.block = func(op, key string) <-chan struct{} {
		if key == "slow" || key == "later" {
			return release
		}
		return nil
	}
	p.fail = func(op, key string, _ map[uint16]string) error {
		if key == "broken" {
			return errors.New("cannot enter")
		}
		return nil
	}
	r, _ := newReconciler(t, p)
	routes := map[uint16]string{6000: "svc"}
	r.Desire([]Namespace{ns("fast", routes), ns("slow", routes), ns("broken", routes)})
	waitFor(t, "fast applied", func() bool { _, ok := p.applied("fast"); return ok }, p.calls)
	time.Sleep(20 * time.Millisecond)
	if isClosed(r.Settled()) {
		t.Fatal("settled before Full")
	}
	r.Full()
	// A namespace desired after Full is not waited for, however slow.
	r.Desire([]Namespace{ns("fast", routes), ns("slow", routes), ns("broken", routes), ns("later", routes)})
	time.Sleep(50 * time.Millisecond) // broken has failed (and been retried) meanwhile
	if isClosed(r.Settled()) {
		t.Fatal("settled while slow's set-up runs")
	}
	close(release)
	select {
	case <-r.Settled():
	case <-time.After(30 * time.Second):
		t.Fatal("not settled 30s after slow's set-up ended")
	}
}

// TestSettledEmptyAndRemoved: with nothing desired Full settles at once,
// and a namespace no longer desired is not waited for.
func TestSettledEmptyAndRemoved(t *testing.T) {
	r, _ := newReconciler(t, newPaths("relay")...)
	r.Full()
	if !isClosed(r.Settled()) {
		t.Error("nothing desired: not settled at Full")
	}

	p := newPaths("relay")[0]
	stuck := make(chan struct{})
	defer close(stuck)
	p.block = func(op, key string) <-chan struct{} { return stuck }
	r2, _ := newReconciler(t, p)
	r2.Desire([]Namespace{ns("stuck", map[uint16]string{6000: "svc"})})
	r2.Full()
	if isClosed(r2.Settled()) {
		t.Fatal("settled while stuck's set-up runs")
	}
	r2.Desire(nil)
	if !isClosed(r2.Settled()) {
		t.Error("not settled once the only waited-for namespace is no longer desired")
	}
}
