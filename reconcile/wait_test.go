package reconcile

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
)

// WaitApplied returns only once every path has applied the namespace, and
// at once with ErrNotWanted for a namespace not desired.
func TestWaitApplied(t *testing.T) {
	testenv.CheckGoroutines(t)
	ps := newPaths("socket", "relay")
	gate := make(chan struct{})
	ps[1].block = func(op, key string) <-chan struct{} {
		if op == "apply" {
			return gate
		}
		return nil
	}
	r, _ := newReconciler(t, ps...)
	ctx := context.Background()
	if err := r.WaitApplied(ctx, "k", nil); !errors.Is(err, ErrNotWanted) {
		t.Fatalf("before Desire: %v; want ErrNotWanted", err)
	}
	r.Desire([]Namespace{ns("k", map[uint16]string{6000: "a"})})
	done := make(chan error, 1)
	go func() { done <- r.WaitApplied(ctx, "k", nil) }()
	select {
	case err := <-done:
		t.Fatalf("returned %v while the relay's Apply was blocked", err)
	case <-time.After(50 * time.Millisecond):
	}
	close(gate)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if _, ok := ps[1].applied("k"); !ok {
		t.Fatal("WaitApplied returned before the relay applied")
	}
	// Applied already: at once.
	if err := r.WaitApplied(ctx, "k", nil); err != nil {
		t.Fatal(err)
	}
	// No longer desired while waiting: ErrNotWanted.
	ps[0].fail = func(op, key string, _ map[uint16]string) error {
		if op == "apply" {
			return errors.New("refused")
		}
		return nil
	}
	r.Desire([]Namespace{ns("k", map[uint16]string{6000: "b"})})
	go func() { done <- r.WaitApplied(ctx, "k", nil) }()
	time.Sleep(30 * time.Millisecond)
	r.Desire(nil)
	if err := <-done; !errors.Is(err, ErrNotWanted) {
		t.Fatalf("after the namespace went: %v; want ErrNotWanted", err)
	}
}

// A set-up that keeps failing: WaitApplied gives up with ctx, naming the
// failure.
func TestWaitAppliedFailing(t *testing.T) {
	testenv.CheckGoroutines(t)
	ps := newPaths("relay")
	ps[0].fail = func(op, key string, _ map[uint16]string) error { return errors.New("no iptables") }
	r, _ := newReconciler(t, ps...)
	r.Desire([]Namespace{ns("k", map[uint16]string{6000: "a"})})
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	err := r.WaitApplied(ctx, "k", nil)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v; want the deadline", err)
	}
}
