package netns_test

import (
	"errors"
	"io/fs"
	"os"
	"sync"
	"testing"

	"github.com/connectable/connectable/internal/testenv"
	"github.com/connectable/connectable/netns"
)

// openFDs counts this process's open descriptors.
func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func TestHandleEntersItsNamespace(t *testing.T) {
	testenv.NeedRoot(t)
	ns := testenv.NewNetNS(t)
	h, err := netns.Open(ns)
	if err != nil {
		t.Fatalf("Open(%s): %v", ns, err)
	}
	defer h.Release()
	if want := inode(t, ns); h.Inode() != want {
		t.Errorf("Inode() = %d; the namespace file's is %d", h.Inode(), want)
	}
	home := inode(t, "/proc/self/ns/net")
	for name, do := range map[string]func(func() error) error{
		"Handle.Do":  h.Do,
		"Do(Name())": func(fn func() error) error { return netns.Do(h.Name(), fn) },
	} {
		var inside uint64
		if err := do(func() (err error) { inside, err = threadNS(); return err }); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if inside != h.Inode() {
			t.Errorf("%s ran fn in namespace %d; want %d", name, inside, h.Inode())
		}
		if after, _ := threadNS(); after != home {
			t.Errorf("%s left the thread in namespace %d", name, after)
		}
	}
	// Listen by name: the listener lives in the handle's namespace.
	v4, v6, err := netns.Listen(h.Name(), 0)
	if err != nil {
		t.Fatalf("Listen(%s): %v", h.Name(), err)
	}
	defer v4.Close()
	if v6 != nil {
		defer v6.Close()
	}
	if err := dialIn(t, ns, v4.Addr().String()); err != nil {
		t.Errorf("listener by handle not reachable inside the namespace: %v", err)
	}
	if netns.Gone(h.Name()) {
		t.Errorf("Gone(%s) of an open handle", h.Name())
	}
}

func TestHandleRefusesHostAndOwnNamespace(t *testing.T) {
	testenv.NeedRoot(t)
	for _, p := range []string{"/proc/self/ns/net", "/proc/1/ns/net", "/proc/thread-self/ns/net"} {
		h, err := netns.Open(p)
		if err == nil {
			h.Release()
			t.Errorf("Open(%s) succeeded", p)
			continue
		}
		if errors.Is(err, fs.ErrPermission) && p == "/proc/1/ns/net" {
			continue // PID 1 is not ours to inspect here (a sandbox): nobody can enter it
		}
		if !errors.Is(err, netns.ErrForbidden) {
			t.Errorf("Open(%s) = %v; want ErrForbidden", p, err)
		}
	}
	if h, err := netns.Open("/dev/null"); err == nil {
		h.Release()
		t.Errorf("Open(/dev/null) succeeded")
	}
}

func TestHandleReleaseClosesOnce(t *testing.T) {
	testenv.NeedRoot(t)
	ns := testenv.NewNetNS(t)
	before := openFDs(t)
	h, err := netns.Open(ns)
	if err != nil {
		t.Fatal(err)
	}
	name := h.Name()
	if !h.Acquire() {
		t.Fatal("Acquire of an open handle failed")
	}
	release, err := netns.Hold(name)
	if err != nil {
		t.Fatalf("Hold: %v", err)
	}
	h.Release()
	h.Release()
	// Held by Hold only: still open, still entered.
	if err := netns.Do(name, func() error { return nil }); err != nil {
		t.Errorf("Do after the owners' releases, with a Hold left: %v", err)
	}
	if got := openFDs(t); got != before+1 {
		t.Errorf("%d descriptors open with the handle held; want %d", got, before+1)
	}
	release()
	release() // a second call is a no-op
	if got := openFDs(t); got != before {
		t.Errorf("%d descriptors open after the last release; want %d", got, before)
	}
	ran := false
	err = netns.Do(name, func() error { ran = true; return nil })
	if !errors.Is(err, netns.ErrClosed) || !errors.Is(err, fs.ErrNotExist) || ran {
		t.Errorf("Do on a released handle's name = %v (fn ran: %v); want ErrClosed and fn not run", err, ran)
	}
	if err := h.Do(func() error { ran = true; return nil }); !errors.Is(err, netns.ErrClosed) || ran {
		t.Errorf("Handle.Do after release = %v (fn ran: %v)", err, ran)
	}
	if !netns.Gone(name) || !h.Closed() || h.Acquire() {
		t.Errorf("released handle: Gone %v, Closed %v; want both true and Acquire false", netns.Gone(name), h.Closed())
	}
	if _, err := netns.Hold(name); !errors.Is(err, netns.ErrClosed) {
		t.Errorf("Hold of a released handle = %v; want ErrClosed", err)
	}
	// A new handle never takes an old one's name, even on the same
	// descriptor number.
	h2, err := netns.Open(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h2.Release()
	if h2.Name() == name {
		t.Errorf("a new handle reuses the name %s", name)
	}
}

// An operation in flight keeps the descriptor: releasing the last owner's
// reference meanwhile closes it only once the operation is done.
func TestHandleReleaseDuringDo(t *testing.T) {
	testenv.NeedRoot(t)
	ns := testenv.NewNetNS(t)
	want := inode(t, ns)
	before := openFDs(t)
	for range 50 {
		h, err := netns.Open(ns)
		if err != nil {
			t.Fatal(err)
		}
		inside, entered := make(chan struct{}), make(chan struct{})
		var wg sync.WaitGroup
		var got uint64
		var doErr error
		wg.Add(1)
		go func() {
			defer wg.Done()
			doErr = h.Do(func() error {
				close(entered)
				<-inside
				var err error
				got, err = threadNS()
				return err
			})
		}()
		<-entered
		h.Release()
		close(inside)
		wg.Wait()
		if doErr != nil || got != want {
			t.Fatalf("Do across a Release: err %v, ran in %d; want nil, %d", doErr, got, want)
		}
	}
	if got := openFDs(t); got != before {
		t.Errorf("%d descriptors open after 50 handles; want %d", got, before)
	}
}
