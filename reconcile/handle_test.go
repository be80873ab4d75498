package reconcile

import (
	"context"
	"errors"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
	"github.com/connectable/connectable/netns"
)

// namePath records the namespace names its Applies get and fails them on
// demand.
type namePath struct {
	mu      sync.Mutex
	fail    bool
	applied map[string]string // key → netns of the last successful Apply
	tried   []string          // netns of every Apply
}

func (p *namePath) Apply(_ context.Context, key, ns string, _ map[uint16]string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.tried = append(p.tried, ns)
	if p.fail {
		return errors.New("failing on demand")
	}
	p.applied[key] = ns
	return nil
}

func (p *namePath) Remove(_ context.Context, key string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.applied, key)
	return nil
}

func (p *namePath) state(f func(p *namePath) bool) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return f(p)
}

func waitHandle(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func fdCount(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// The Reconciler keeps a namespace's handle open from Desire until the
// key's state that superseded it is in place, whoever handed it over, and
// closes each handle exactly once.
func TestHandleLifetime(t *testing.T) {
	testenv.NeedRoot(t)
	ns1, ns2 := testenv.NewNetNS(t), testenv.NewNetNS(t)
	before := fdCount(t)
	p := &namePath{applied: map[string]string{}}
	r := New(Config{Paths: []Path{p}, RetryMin: 5 * time.Millisecond, RetryMax: 20 * time.Millisecond})
	defer r.Close()
	routes := map[uint16]string{6000: "a"}

	h1, err := netns.Open(ns1)
	if err != nil {
		t.Fatal(err)
	}
	r.Desire([]Namespace{{Key: "k", Path: ns1, NetNS: h1, Routes: routes}})
	h1.Release() // the watcher lets go at once
	waitHandle(t, "the first handle applied", func() bool {
		return p.state(func(p *namePath) bool { return p.applied["k"] == h1.Name() })
	})
	if h1.Closed() {
		t.Fatal("handle of the applied namespace closed")
	}

	// A new namespace for the key whose set-up fails: the old handle stays
	// open, since the path may still have to tear that namespace down.
	p.mu.Lock()
	p.fail = true
	p.mu.Unlock()
	h2, err := netns.Open(ns2)
	if err != nil {
		t.Fatal(err)
	}
	r.Desire([]Namespace{{Key: "k", Path: ns2, NetNS: h2, Routes: routes}})
	h2.Release()
	waitHandle(t, "a failed Apply of the second handle", func() bool {
		return p.state(func(p *namePath) bool {
			n := 0
			for _, s := range p.tried {
				if s == h2.Name() {
					n++
				}
			}
			return n >= 2
		})
	})
	if h1.Closed() || h2.Closed() {
		t.Fatalf("a handle closed while its key's set-up fails: first %v, second %v", h1.Closed(), h2.Closed())
	}

	p.mu.Lock()
	p.fail = false
	p.mu.Unlock()
	waitHandle(t, "the second handle applied and the first closed", func() bool {
		return p.state(func(p *namePath) bool { return p.applied["k"] == h2.Name() }) && h1.Closed()
	})
	if h2.Closed() {
		t.Fatal("handle of the applied namespace closed")
	}

	r.Desire(nil)
	waitHandle(t, "removal to close the second handle", h2.Closed)
	if got := fdCount(t); got != before {
		t.Errorf("%d descriptors open at the end; want %d", got, before)
	}
	for _, s := range p.tried {
		if !netns.IsHandle(s) {
			t.Errorf("a path was handed %q, not a handle's name", s)
		}
	}
}

// Close releases what the Reconciler holds, applied or not.
func TestHandleReleasedByClose(t *testing.T) {
	testenv.NeedRoot(t)
	ns := testenv.NewNetNS(t)
	p := &namePath{applied: map[string]string{}, fail: true}
	r := New(Config{Paths: []Path{p}, RetryMin: 5 * time.Millisecond, RetryMax: 20 * time.Millisecond})
	h, err := netns.Open(ns)
	if err != nil {
		t.Fatal(err)
	}
	r.Desire([]Namespace{{Key: "k", Path: ns, NetNS: h, Routes: map[uint16]string{1: "a"}}})
	h.Release()
	waitHandle(t, "an attempt", func() bool { return p.state(func(p *namePath) bool { return len(p.tried) > 0 }) })
	r.Close()
	if !h.Closed() {
		t.Error("handle open after Close")
	}
	r.Close() // twice: nothing released twice
}
