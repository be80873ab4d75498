package sockpath

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/connectable/connectable/internal/testenv"
	"github.com/connectable/connectable/netns"
)

// The relay's backend sockets get, for --backend-timeout 30s, a user
// timeout of 30 s and keepalive after 15 s every 5 s (proxy/dial_test.go);
// the socket path's must be the same.
func TestSilenceBoundSettings(t *testing.T) {
	for _, tc := range []struct {
		d    time.Duration
		want kernSilenceBound
	}{
		{30 * time.Second, kernSilenceBound{UserTimeoutMs: 30000, Keepidle: 15, Keepintvl: 5, Keepcnt: 3}},
		{0, kernSilenceBound{}},
		{2 * time.Second, kernSilenceBound{UserTimeoutMs: 2000, Keepidle: 1, Keepintvl: 1, Keepcnt: 3}},
		{1500 * time.Millisecond, kernSilenceBound{UserTimeoutMs: 1500, Keepidle: 1, Keepintvl: 1, Keepcnt: 3}},
		{1000 * time.Hour, kernSilenceBound{UserTimeoutMs: 1<<31 - 1, Keepidle: 32767, Keepintvl: 32767, Keepcnt: 3}},
		{-1, kernSilenceBound{}},
	} {
		if got := silenceBound(tc.d); got != tc.want {
			t.Errorf("silenceBound(%v) = %+v; want %+v", tc.d, got, tc.want)
		}
	}
}

// sink accepts connections in ns and reads them until they end, without
// ever answering or closing them first: a backend that holds long-lived
// connections.
type sink struct {
	ln    net.Listener
	addr  netip.AddrPort
	mu    sync.Mutex
	conns []net.Conn
	wg    sync.WaitGroup
}

func startSink(t *testing.T, ns, addr string) *sink {
	t.Helper()
	s := &sink{}
	err := netns.Do(ns, func() error {
		var err error
		s.ln, err = net.Listen("tcp", addr)
		return err
	})
	if err != nil {
		t.Fatalf("sink on %s: %v", addr, err)
	}
	s.addr = netip.MustParseAddrPort(s.ln.Addr().String())
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := s.ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.conns = append(s.conns, c)
			s.mu.Unlock()
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				io.Copy(io.Discard, c)
			}()
		}
	}()
	t.Cleanup(func() {
		s.ln.Close()
		s.mu.Lock()
		for _, c := range s.conns {
			c.Close()
		}
		s.mu.Unlock()
		s.wg.Wait()
	})
	return s
}

// dialIn connects to addr from inside ns, leaving keepalive as the kernel
// has it (Go's dialer would turn it on), after control has set the socket
// up (if not nil).
func dialIn(t *testing.T, ns, addr string, control func(fd int) error) *net.TCPConn {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second, KeepAlive: -1}
	if control != nil {
		d.Control = func(_, _ string, rc syscall.RawConn) error {
			var cerr error
			if err := rc.Control(func(fd uintptr) { cerr = control(int(fd)) }); err != nil {
				return err
			}
			return cerr
		}
	}
	var c net.Conn
	err := netns.Do(ns, func() error {
		var err error
		c, err = d.Dial("tcp", addr)
		return err
	})
	if err != nil {
		t.Fatalf("connecting to %s in %s: %v", addr, ns, err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// silenceOpts is what getsockopt reads on a socket.
type silenceOpts struct {
	UserTimeoutMs, KeepAlive, Idle, Interval, Count int
}

func readSilenceOpts(t *testing.T, c *net.TCPConn) silenceOpts {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var o silenceOpts
	var errs []error
	get := func(fd, level, opt int, v *int) {
		var err error
		*v, err = unix.GetsockoptInt(fd, level, opt)
		errs = append(errs, err)
	}
	err = rc.Control(func(fd uintptr) {
		get(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, &o.UserTimeoutMs)
		get(int(fd), unix.SOL_SOCKET, unix.SO_KEEPALIVE, &o.KeepAlive)
		get(int(fd), unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, &o.Idle)
		get(int(fd), unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, &o.Interval)
		get(int(fd), unix.IPPROTO_TCP, unix.TCP_KEEPCNT, &o.Count)
	})
	if err := errors.Join(append(errs, err)...); err != nil {
		t.Fatalf("reading the socket's options: %v", err)
	}
	return o
}

// The connections the programs rewrote get the daemon's bound once
// established; what an application set itself, and sockets the programs
// did not rewrite, are left alone; a negative bound leaves every socket
// alone.
func TestSilenceBoundOptions(t *testing.T) {
	f := newFixture(t)
	k := f.p.k.(*Kernel)
	s := startSink(t, f.ns, "198.18.201.1:0")
	f.res.set("s", group(1, []netip.AddrPort{s.addr}))
	f.apply(map[uint16]string{6000: "s"})

	// Before any bound is set (the map's zero value), sockets are left alone.
	if o := readSilenceOpts(t, dialIn(t, f.ns, "127.0.0.1:6000", nil)); o.UserTimeoutMs != 0 || o.KeepAlive != 0 {
		t.Errorf("with no bound set, a rewritten socket has %+v; want the kernel's defaults", o)
	}

	if err := k.SetSilenceBound(2 * time.Second); err != nil {
		t.Fatal(err)
	}
	want := silenceOpts{UserTimeoutMs: 2000, KeepAlive: 1, Idle: 1, Interval: 1, Count: 3}
	for _, addr := range []string{"127.0.0.1:6000", "[::ffff:127.0.0.1]:6000"} {
		if o := readSilenceOpts(t, dialIn(t, f.ns, addr, nil)); o != want {
			t.Errorf("rewritten connect to %s: %+v; want %+v", addr, o, want)
		}
	}

	// A socket the programs did not rewrite: the same backend, dialled
	// directly.
	if o := readSilenceOpts(t, dialIn(t, f.ns, s.addr.String(), nil)); o.UserTimeoutMs != 0 || o.KeepAlive != 0 {
		t.Errorf("a connect not rewritten has %+v; want the kernel's defaults", o)
	}

	// An application's own settings, made before the connect, stay.
	own := dialIn(t, f.ns, "127.0.0.1:6000", func(fd int) error {
		return errors.Join(
			unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, 7000),
			unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, 100),
			unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1))
	})
	if o := readSilenceOpts(t, own); o.UserTimeoutMs != 7000 || o.KeepAlive != 1 || o.Idle != 100 || o.Interval == 1 || o.Count == 3 {
		t.Errorf("an application's own TCP_USER_TIMEOUT 7000 and keepalive after 100 s became %+v", o)
	}
	// Only the user timeout set: the keepalive is still the bound's.
	ut := dialIn(t, f.ns, "127.0.0.1:6000", func(fd int) error {
		return unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, 7000)
	})
	if o, w := readSilenceOpts(t, ut), (silenceOpts{7000, 1, 1, 1, 3}); o != w {
		t.Errorf("an application's own TCP_USER_TIMEOUT 7000 alone: %+v; want %+v", o, w)
	}

	if err := k.SetSilenceBound(-1); err != nil {
		t.Fatal(err)
	}
	if o := readSilenceOpts(t, dialIn(t, f.ns, "127.0.0.1:6000", nil)); o.UserTimeoutMs != 0 || o.KeepAlive != 0 {
		t.Errorf("with a negative bound, a rewritten socket has %+v; want the kernel's defaults", o)
	}
	if st, err := k.stats(); err != nil || st[kernStatSTAT_UNBOUNDED] != 0 {
		t.Errorf("the kernel failed to bound %v sockets (%v)", st, err)
	}
}

// A rewritten connection whose backend goes silent without a reset (a host
// cut off) ends within the bound, with data in flight and idle alike,
// where the kernel's defaults would retransmit for 15 minutes or wait for
// ever.
func TestSilenceBoundEndsSilentConnections(t *testing.T) {
	testenv.NeedCommand(t, "iptables")
	f := newFixture(t)
	k := f.p.k.(*Kernel)
	s := startSink(t, f.ns, "198.18.201.1:0")
	f.res.set("s", group(1, []netip.AddrPort{s.addr}))
	f.apply(map[uint16]string{6000: "s"})
	const bound = 2 * time.Second
	if err := k.SetSilenceBound(bound); err != nil {
		t.Fatal(err)
	}
	busy := dialIn(t, f.ns, "127.0.0.1:6000", nil)
	idle := dialIn(t, f.ns, "127.0.0.1:6000", nil)
	// A connection that works, before the fault.
	if _, err := busy.Write(make([]byte, 1024)); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)

	// The backend's host vanishes: every packet to or from it is dropped,
	// in the test's own namespace (the client and the backend share it).
	port := s.addr.Port()
	for _, dir := range []string{"--dport", "--sport"} {
		testenv.Exec(t, f.ns, "iptables", "-w", "-I", "INPUT", "-p", "tcp", "-d", s.addr.Addr().String(), dir, strconv.Itoa(int(port)), "-j", "DROP")
	}
	cut := time.Now()
	if _, err := busy.Write(make([]byte, 64*1024)); err != nil {
		t.Fatalf("writing after the cut: %v", err)
	}

	// The kernel's defaults never end the idle one and take 15 minutes
	// for the busy one: a read still blocked after the deadline fails.
	const slack = 8 * time.Second
	type result struct {
		name  string
		after time.Duration
		err   error
	}
	results := make(chan result, 2)
	for name, c := range map[string]*net.TCPConn{"in flight": busy, "idle": idle} {
		go func() {
			c.SetReadDeadline(cut.Add(30 * time.Second))
			_, err := c.Read(make([]byte, 1))
			results <- result{name, time.Since(cut), err}
		}()
	}
	for range 2 {
		r := <-results
		t.Logf("%s connection ended %v after the cut: %v", r.name, r.after.Round(time.Millisecond), r.err)
		switch {
		case !errors.Is(r.err, syscall.ETIMEDOUT):
			t.Errorf("%s connection: %v; want ETIMEDOUT within %v", r.name, r.err, bound)
		case r.after < bound/2 || r.after > bound+slack:
			t.Errorf("%s connection ended %v after the cut; want about %v", r.name, r.after, bound)
		}
	}
}
