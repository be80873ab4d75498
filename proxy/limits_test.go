package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
)

// TestNamespaceConnCap: at its cap a namespace's new connections are reset
// at accept and counted; another namespace is still served, and once the
// held connections end the namespace is served again.
func TestNamespaceConnCap(t *testing.T) {
	testenv.CheckGoroutines(t)
	a := testenv.StartBackend(t, tagEcho('a'))
	res := newResolver(false)
	res.set("svc", a.Addr)
	logs := &testenv.SyncBuffer{}
	s := newServer(t, res, func(s *Server) {
		s.MaxConnsPerNamespace = 2
		s.Logger = testenv.Logger(t, logs)
	})
	for _, key := range []string{"c1", "c2"} {
		if err := s.Apply(context.Background(), key, "", map[uint16]string{6000: "svc"}); err != nil {
			t.Fatal(err)
		}
	}
	c1, c2 := proxyAddr(t, s, "c1"), proxyAddr(t, s, "c2")
	var held []net.Conn
	for range 2 {
		c := dialPort(t, c1, 6000)
		readTag(t, c)
		held = append(held, c)
	}
	for range 3 {
		expectReset(t, c1)
	}
	if got := readTag(t, dialPort(t, c2, 6000)); got != 'a' {
		t.Errorf("the other namespace reached %q; want a", got)
	}
	if st := s.Stats(); st.LimitedNamespace != 3 || st.LimitedGlobal != 0 {
		t.Errorf("limited: namespace %d, global %d; want 3 and 0", st.LimitedNamespace, st.LimitedGlobal)
	}
	if n := logs.Count("namespace at its connection cap"); n != 1 {
		t.Errorf("%d cap log lines for 3 resets within the interval; want 1", n)
	}
	for _, c := range held {
		c.Close()
	}
	waitFor(t, "the held connections to end", func() bool { return s.Stats().Namespaces["c1"] == 0 })
	if got := readTag(t, dialPort(t, c1, 6000)); got != 'a' {
		t.Errorf("after the cap: reached %q; want a", got)
	}
}

// expectReset connects to the proxy at addr as port 6000 and checks that
// the connection is reset. The reset may beat the end of connect(2), which
// then reports it.
func expectReset(t *testing.T, addr netip.AddrPort) {
	t.Helper()
	d := net.Dialer{
		LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 1, 6000>>8, 6000&0xff)},
		Control:   bindAddressNoPort,
		Timeout:   10 * time.Second,
	}
	c, err := d.Dial("tcp4", addr.String())
	if err == nil {
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err = c.Read(make([]byte, 1))
	}
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("connection over the cap: %v; want a reset", err)
	}
}

// TestGlobalConnCap: the server-wide cap resets whichever namespace goes
// over it.
func TestGlobalConnCap(t *testing.T) {
	testenv.CheckGoroutines(t)
	a := testenv.StartBackend(t, tagEcho('a'))
	res := newResolver(false)
	res.set("svc", a.Addr)
	s := newServer(t, res, func(s *Server) { s.MaxConns = 1 })
	for _, key := range []string{"c1", "c2"} {
		if err := s.Apply(context.Background(), key, "", map[uint16]string{6000: "svc"}); err != nil {
			t.Fatal(err)
		}
	}
	held := dialPort(t, proxyAddr(t, s, "c1"), 6000)
	readTag(t, held)
	defer held.Close()
	expectReset(t, proxyAddr(t, s, "c2"))
	if st := s.Stats(); st.LimitedGlobal != 1 {
		t.Errorf("limited globally: %d; want 1", st.LimitedGlobal)
	}
}

// TestDialSlots: with one dial slot, a blackholed backend holds one dial
// at a time: a second connection waits for the first's dial to time out
// before it resolves and dials.
func TestDialSlots(t *testing.T) {
	testenv.CheckGoroutines(t)
	hole := testenv.Blackhole(t)
	res := newResolver(false)
	res.set("svc", hole)
	s := newServer(t, res, func(s *Server) {
		s.MaxDialsPerNamespace = 1
		s.ConnectTimeout = time.Second
		s.DialTimeout = 10 * time.Second
	})
	if err := s.Apply(context.Background(), "c1", "", map[uint16]string{6000: "svc"}); err != nil {
		t.Fatal(err)
	}
	addr := proxyAddr(t, s, "c1")
	first := dialPort(t, addr, 6000)
	defer first.Close()
	waitFor(t, "the first dial to start", func() bool { return res.count("svc") == 1 })
	second := dialPort(t, addr, 6000)
	defer second.Close()
	waitFor(t, "both connections accepted", func() bool { return s.Stats().Namespaces["c1"] == 2 })
	if n := res.count("svc"); n != 1 {
		t.Errorf("%d lookups while the first dial holds the only slot; want 1", n)
	}
	expectClosed(t, first, 10*time.Second)
	waitFor(t, "the second dial to start", func() bool { return res.count("svc") == 2 })
	expectClosed(t, second, 10*time.Second)
}

// TestHealthPerService: endpoints failing for one service leave another
// service's view of a shared endpoint alone, and a service no namespace
// routes to any more leaves the stats.
func TestHealthPerService(t *testing.T) {
	testenv.CheckGoroutines(t)
	a := testenv.StartBackend(t, tagEcho('a'))
	dead := freePort(t)
	res := newResolver(false)
	res.set("bad", dead)
	res.set("good", a.Addr)
	s := newServer(t, res, nil)
	if err := s.Apply(context.Background(), "c1", "", map[uint16]string{6000: "bad", 6001: "good"}); err != nil {
		t.Fatal(err)
	}
	addr := proxyAddr(t, s, "c1")
	expectClosed(t, dialPort(t, addr, 6000), 10*time.Second)
	if got := readTag(t, dialPort(t, addr, 6001)); got != 'a' {
		t.Fatalf("good reached %q", got)
	}
	waitFor(t, "the failure recorded", func() bool { return s.Stats().DialFailures[dead] == 1 })
	s.stats.mu.Lock()
	good := s.stats.services["good"]
	s.stats.mu.Unlock()
	if st := good.health.status([]netip.AddrPort{dead})[0]; !st.Healthy || st.DialFailures != 0 {
		t.Errorf("good's table knows of bad's failure: %+v", st)
	}

	if err := s.Apply(context.Background(), "c1", "", map[uint16]string{6001: "good"}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "bad to leave the stats", func() bool {
		st := s.Stats()
		_, bad := st.Services["bad"]
		_, ok := st.Services["good"]
		return !bad && ok && st.DialFailures[dead] == 0
	})
}

// TestConnLogsRateLimited: a flood of direct connections to the proxy port
// logs one line per interval, and the next line counts the rest.
func TestConnLogsRateLimited(t *testing.T) {
	testenv.CheckGoroutines(t)
	res := newResolver(false)
	logs := &testenv.SyncBuffer{}
	s := newServer(t, res, func(s *Server) { s.Logger = testenv.Logger(t, logs) })
	if err := s.Apply(context.Background(), "c1", "", map[uint16]string{6000: "svc"}); err != nil {
		t.Fatal(err)
	}
	addr := proxyAddr(t, s, "c1")
	for range 20 {
		c, err := net.Dial("tcp4", addr.String())
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, c)
		c.Close()
	}
	waitFor(t, "20 rejections", func() bool { return s.Stats().Rejected == 20 })
	if n := logs.Count("direct connection to proxy port refused"); n != 1 {
		t.Errorf("%d log lines for 20 direct connections; want 1", n)
	}
}
