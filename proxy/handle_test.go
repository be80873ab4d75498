package proxy

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/connectable/connectable/internal/testenv"
	"github.com/connectable/connectable/netns"
)

// inodeRedirector records, per call, the namespace it was run in.
type inodeRedirector struct {
	mu    sync.Mutex
	calls []string
}

func (r *inodeRedirector) record(op, ns string) error {
	return netns.Do(ns, func() error {
		fi, err := os.Stat("/proc/thread-self/ns/net")
		if err != nil {
			return err
		}
		r.mu.Lock()
		r.calls = append(r.calls, fmt.Sprintf("%s %d", op, fi.Sys().(*syscall.Stat_t).Ino))
		r.mu.Unlock()
		return nil
	})
}

func (r *inodeRedirector) Apply(ns string, _ []uint16, _ uint16) error { return r.record("apply", ns) }
func (r *inodeRedirector) Clear(ns string) error                       { return r.record("clear", ns) }
func (r *inodeRedirector) Port(string) (uint16, error)                 { return 0, nil }

// A space keeps the namespace handle it was given until its teardown: the
// caller may let go right after Apply, and the Remove that comes later
// still clears the rules in that namespace, then closes the descriptor.
func TestSpaceHoldsNamespaceHandle(t *testing.T) {
	testenv.NeedRoot(t)
	testenv.CheckGoroutines(t)
	ns := testenv.NewNetNS(t)
	checkFDs(t)
	h, err := netns.Open(ns)
	if err != nil {
		t.Fatal(err)
	}
	ino := h.Inode()
	name := h.Name()
	red := &inodeRedirector{}
	s := &Server{Resolver: newResolver(false), Redirector: red, Logger: testLogger(t, -4)}
	defer s.Close()
	if err := s.Apply(context.Background(), "c1", name, map[uint16]string{6000: "a.service"}); err != nil {
		t.Fatal(err)
	}
	h.Release()
	st := s.Namespaces()
	if len(st) != 1 || st[0].Port == 0 {
		t.Fatalf("namespaces: %+v", st)
	}
	if !strings.HasPrefix(st[0].NetNS, ns+" (inode ") {
		t.Errorf("status shows netns %q; want where the handle was opened, %s, and its inode", st[0].NetNS, ns)
	}
	// The listener is in the handle's namespace.
	if _, err := dialIn(t, ns, "tcp4", fmt.Sprintf("127.0.0.1:%d", st[0].Port)); err != nil {
		t.Errorf("dialling the proxy port inside the namespace: %v", err)
	}
	if netns.Gone(name) {
		t.Fatal("the handle closed while its space is applied")
	}
	// With the direct connection still live, Remove would put the
	// teardown off until it ends (linger_test.go).
	waitFor(t, "the direct connection to end", func() bool { st := s.Namespaces(); return len(st) == 1 && st[0].Active == 0 })
	if err := s.Remove(context.Background(), "c1"); err != nil {
		t.Fatalf("Remove: %v", err)
	}
	want := []string{fmt.Sprintf("apply %d", ino), fmt.Sprintf("clear %d", ino)}
	if fmt.Sprint(red.calls) != fmt.Sprint(want) {
		t.Errorf("redirector calls %v; want %v", red.calls, want)
	}
	if !netns.Gone(name) {
		t.Error("the handle still open after the space's teardown")
	}
	// A released handle's name is refused, not a path to open.
	if err := s.Apply(context.Background(), "c2", name, map[uint16]string{6000: "a.service"}); err == nil {
		t.Error("Apply by a released handle's name succeeded")
	}
}

// Close clears the rules last, after the drain: the space's handle must
// still be open then, whoever else let go.
func TestCloseClearsThroughHeldHandle(t *testing.T) {
	testenv.NeedRoot(t)
	testenv.CheckGoroutines(t)
	ns := testenv.NewNetNS(t)
	checkFDs(t)
	h, err := netns.Open(ns)
	if err != nil {
		t.Fatal(err)
	}
	ino, name := h.Inode(), h.Name()
	red := &inodeRedirector{}
	s := &Server{Resolver: newResolver(false), Redirector: red, Logger: testLogger(t, -4)}
	if err := s.Apply(context.Background(), "c1", name, map[uint16]string{6000: "a.service"}); err != nil {
		t.Fatal(err)
	}
	h.Release()
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	want := []string{fmt.Sprintf("apply %d", ino), fmt.Sprintf("clear %d", ino)}
	if fmt.Sprint(red.calls) != fmt.Sprint(want) {
		t.Errorf("redirector calls %v; want %v", red.calls, want)
	}
	if !netns.Gone(name) {
		t.Error("the handle still open after Close")
	}
}
