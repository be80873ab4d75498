package netns_test

import (
	"errors"
	"net"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/connectable/connectable/internal/testenv"
	"github.com/connectable/connectable/netns"
)

// inode returns the inode of a namespace file.
func inode(t testing.TB, path string) uint64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatalf("stat %s: %v", path, err)
	}
	return fi.Sys().(*syscall.Stat_t).Ino
}

// threadNS returns the inode of the network namespace of the calling thread,
// without failing (usable from any goroutine).
func threadNS() (uint64, error) {
	fi, err := os.Stat("/proc/thread-self/ns/net")
	if err != nil {
		return 0, err
	}
	return fi.Sys().(*syscall.Stat_t).Ino, nil
}

func TestDoReturnsThreadToItsNamespace(t *testing.T) {
	testenv.NeedRoot(t)
	testenv.GuardRootRules(t)
	ns := testenv.NewNetNS(t)
	home := inode(t, "/proc/self/ns/net")
	target := inode(t, ns)
	if home == target {
		t.Fatalf("test namespace is the host's")
	}

	// Many goroutines, many calls each: threads get reused across calls, so
	// a thread left in the wrong namespace would show up in a later check.
	const workers, calls = 8, 200
	errs := make(chan error, workers)
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range calls {
				var inside uint64
				if err := netns.Do(ns, func() (err error) {
					inside, err = threadNS()
					return err
				}); err != nil {
					errs <- err
					return
				}
				if inside != target {
					errs <- errors.New("fn did not run inside the target namespace")
					return
				}
				after, err := threadNS()
				if err != nil {
					errs <- err
					return
				}
				if after != home {
					errs <- errors.New("thread left in the target namespace after Do")
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestDoRestoresAfterPanic(t *testing.T) {
	testenv.NeedRoot(t)
	ns := testenv.NewNetNS(t)
	home := inode(t, "/proc/self/ns/net")
	done := make(chan uint64)
	go func() {
		defer func() {
			recover()
			n, _ := threadNS()
			done <- n
		}()
		_ = netns.Do(ns, func() error { panic("boom") })
	}()
	if got := <-done; got != home {
		t.Errorf("after a panic in fn the thread is in namespace %d; want %d", got, home)
	}
}

func TestDoPassesErrors(t *testing.T) {
	want := errors.New("from fn")
	if err := netns.Do("", func() error { return want }); !errors.Is(err, want) {
		t.Errorf("Do(\"\") = %v; want %v", err, want)
	}
	if err := netns.Do("/nonexistent/ns", func() error { t.Error("fn ran"); return nil }); err == nil {
		t.Errorf("Do on a missing path: no error")
	}
	testenv.NeedRoot(t)
	ns := testenv.NewNetNS(t)
	if err := netns.Do(ns, func() error { return want }); !errors.Is(err, want) {
		t.Errorf("Do(ns) = %v; want %v", err, want)
	}
}

// transparent reads the mark Listen sets and Gate clears.
func transparent(t *testing.T, ln *net.TCPListener, level, opt int) int {
	t.Helper()
	rc, err := ln.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var v int
	var serr error
	if err := rc.Control(func(fd uintptr) { v, serr = unix.GetsockoptInt(int(fd), level, opt) }); err != nil || serr != nil {
		t.Fatalf("reading the transparent mark: %v %v", err, serr)
	}
	return v
}

// TestListenOwnNamespace also checks the restart guard's mark: Listen
// sets IP_TRANSPARENT (which needs CAP_NET_ADMIN, hence root), Gate
// clears it and leaves the listener open.
func TestListenOwnNamespace(t *testing.T) {
	testenv.NeedRoot(t)
	v4, v6, err := netns.Listen("", 0)
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	defer v4.Close()
	a4 := v4.Addr().(*net.TCPAddr)
	if !a4.IP.Equal(net.IPv4(127, 0, 0, 1)) || a4.Port == 0 {
		t.Errorf("v4 listens on %v", a4)
	}
	if got := transparent(t, v4, unix.SOL_IP, unix.IP_TRANSPARENT); got != 1 {
		t.Errorf("IP_TRANSPARENT = %d after Listen; want 1", got)
	}
	if err := netns.Gate(v4); err != nil {
		t.Fatalf("Gate: %v", err)
	}
	if got := transparent(t, v4, unix.SOL_IP, unix.IP_TRANSPARENT); got != 0 {
		t.Errorf("IP_TRANSPARENT = %d after Gate; want 0", got)
	}
	if err := netns.Drained(v4, time.Second); err != nil {
		t.Errorf("Drained with nothing queued: %v", err)
	}
	if c, err := net.Dial("tcp4", a4.String()); err != nil {
		t.Errorf("a gated listener without the guard's rules: %v; want it still open", err)
	} else {
		c.Close()
	}
	if v6 == nil {
		// Correct only if this namespace really has no usable ::1.
		if ln, err := net.Listen("tcp6", "[::1]:0"); err == nil {
			ln.Close()
			t.Errorf("no IPv6 listener although ::1 is usable")
		}
		return
	}
	defer v6.Close()
	if a6 := v6.Addr().(*net.TCPAddr); !a6.IP.Equal(net.IPv6loopback) || a6.Port != a4.Port {
		t.Errorf("v6 listens on %v; want [::1]:%d", a6, a4.Port)
	}
	if got := transparent(t, v6, unix.SOL_IPV6, unix.IPV6_TRANSPARENT); got != 1 {
		t.Errorf("IPV6_TRANSPARENT = %d after Listen; want 1", got)
	}
	if err := netns.Gate(v6); err != nil {
		t.Fatalf("Gate: %v", err)
	}
	if got := transparent(t, v6, unix.SOL_IPV6, unix.IPV6_TRANSPARENT); got != 0 {
		t.Errorf("IPV6_TRANSPARENT = %d after Gate; want 0", got)
	}
}

// dialIn connects from inside ns and reports whether it worked.
func dialIn(t *testing.T, ns, addr string) error {
	t.Helper()
	var c net.Conn
	err := netns.Do(ns, func() (err error) {
		c, err = net.DialTimeout("tcp", addr, 10*time.Second)
		return err
	})
	if err == nil {
		c.Close()
	}
	return err
}

func TestListenInNamespace(t *testing.T) {
	testenv.NeedRoot(t)
	ns := testenv.NewNetNS(t)
	v4, v6, err := netns.Listen(ns, 0)
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	defer v4.Close()
	if v6 == nil {
		t.Fatalf("no IPv6 listener in a namespace with ::1")
	}
	defer v6.Close()
	port := v4.Addr().(*net.TCPAddr).Port
	if v6.Addr().(*net.TCPAddr).Port != port {
		t.Errorf("ports differ: %v and %v", v4.Addr(), v6.Addr())
	}
	// Reachable from inside the namespace: the sockets live there.
	for _, ln := range []*net.TCPListener{v4, v6} {
		accepted := make(chan error, 1)
		go func() {
			c, err := ln.Accept()
			if err == nil {
				c.Close()
			}
			accepted <- err
		}()
		if err := dialIn(t, ns, ln.Addr().String()); err != nil {
			t.Errorf("dialling %v inside the namespace: %v", ln.Addr(), err)
		}
		if err := <-accepted; err != nil {
			t.Errorf("accepting on %v: %v", ln.Addr(), err)
		}
	}
}

func TestListenFixedPort(t *testing.T) {
	testenv.NeedRoot(t)
	ns := testenv.NewNetNS(t)
	const port = 45123
	v4, v6, err := netns.Listen(ns, port)
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	if v4.Addr().(*net.TCPAddr).Port != port || v6 == nil || v6.Addr().(*net.TCPAddr).Port != port {
		t.Errorf("listening on %v and %v; want port %d on both", v4.Addr(), v6, port)
	}
	v4.Close()
	v6.Close()

	// The port taken on ::1 only: an error, and no IPv4 listener left over.
	var blocker net.Listener
	if err := netns.Do(ns, func() (err error) {
		blocker, err = net.Listen("tcp6", "[::1]:45123")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer blocker.Close()
	if _, _, err := netns.Listen(ns, port); !errors.Is(err, syscall.EADDRINUSE) {
		t.Fatalf("Listen with [::1]:%d taken: %v; want EADDRINUSE", port, err)
	}
	var again net.Listener
	if err := netns.Do(ns, func() (err error) {
		again, err = net.Listen("tcp4", "127.0.0.1:45123")
		return err
	}); err != nil {
		t.Errorf("127.0.0.1:%d still held after a failed Listen: %v", port, err)
	} else {
		again.Close()
	}
}

func TestListenWithoutIPv6(t *testing.T) {
	testenv.NeedRoot(t)
	ns := testenv.NewNetNS(t)
	testenv.Exec(t, ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1")
	v4, v6, err := netns.Listen(ns, 0)
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	defer v4.Close()
	if v6 != nil {
		v6.Close()
		t.Errorf("IPv6 listener on %v in a namespace without IPv6", v6.Addr())
	}
}
