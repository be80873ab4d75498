package proxy

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	endpointhealth "github.com/connectable/connectable/health"
	"github.com/connectable/connectable/internal/testenv"
)

func newHealth() (*health, *testenv.Clock) {
	clock := testenv.NewClock()
	var c healthConfig
	c.init()
	c.now = clock.Now
	var h health
	h.init(c)
	return &h, clock
}

func ep(i int) netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)}), 80)
}

func TestHealthOrder(t *testing.T) {
	h, clock := newHealth()
	a, b, c := ep(1), ep(2), ep(3)
	eps := []netip.AddrPort{a, b, c}
	errRefused := errors.New("refused")

	if got := h.order(eps); !slices.Equal(got, eps) {
		t.Errorf("no history: got %v; want %v", got, eps)
	}
	h.failed(a, errRefused)
	if got, want := h.order(eps), []netip.AddrPort{b, c, a}; !slices.Equal(got, want) {
		t.Errorf("a failed: got %v; want %v", got, want)
	}
	if !slices.Equal(eps, []netip.AddrPort{a, b, c}) {
		t.Errorf("order modified its argument: %v", eps)
	}
	h.failed(c, errRefused)
	if got, want := h.order(eps), []netip.AddrPort{b, a, c}; !slices.Equal(got, want) {
		t.Errorf("a and c failed: got %v; want %v", got, want)
	}
	h.failed(b, errRefused)
	if got := h.order(eps); !slices.Equal(got, eps) {
		t.Errorf("all failed: got %v; want all of them, in order %v", got, eps)
	}
	clock.Advance(backoffMin)
	if got := h.order(eps); !slices.Equal(got, eps) {
		t.Errorf("back-off over: got %v; want %v", got, eps)
	}
	h.failed(a, errRefused) // second in a row: 2s
	clock.Advance(backoffMin)
	if got, want := h.order(eps), []netip.AddrPort{b, c, a}; !slices.Equal(got, want) {
		t.Errorf("a failed twice, 1s later: got %v; want %v", got, want)
	}
	h.succeeded(a)
	if got := h.order(eps); !slices.Equal(got, eps) {
		t.Errorf("a succeeded: got %v; want %v", got, eps)
	}
	st := h.status([]netip.AddrPort{a})[0]
	if !st.Healthy || st.Failures != 0 || st.DialFailures != 2 || st.LastError != "refused" {
		t.Errorf("status of a: %+v", st)
	}
}

func TestHealthBackoff(t *testing.T) {
	h, clock := newHealth()
	want := []time.Duration{1, 2, 4, 8, 16, 30, 30, 30}
	for i, w := range want {
		h.failed(ep(1), errors.New("refused"))
		if got := h.status([]netip.AddrPort{ep(1)})[0].RetryAt.Sub(clock.Now()); got != w*time.Second {
			t.Errorf("backoff after %d failures: got %v; want %v", i+1, got, w*time.Second)
		}
	}
	for range 1000 {
		h.failed(ep(1), errors.New("refused"))
	}
	if got := h.status([]netip.AddrPort{ep(1)})[0].RetryAt.Sub(clock.Now()); got != backoffMax {
		t.Errorf("backoff after 1008 failures: got %v; want %v", got, backoffMax)
	}
}

func TestHealthBounded(t *testing.T) {
	h, clock := newHealth()
	for i := range 3 * healthMaxEntries {
		h.failed(ep(i), errors.New("refused"))
		if h.t.Len() > healthMaxEntries {
			t.Fatalf("%d entries after %d failures; want at most %d", h.t.Len(), i+1, healthMaxEntries)
		}
	}
	clock.Advance(healthForget + time.Minute)
	h.failed(ep(0), errors.New("refused"))
	if h.t.Len() != 1 {
		t.Errorf("%d entries after everything aged out; want 1", h.t.Len())
	}
}

// TestPassiveBackoff moves traffic off a dead endpoint and back once it
// returns, through real connections, with the health clock under control.
func TestPassiveBackoff(t *testing.T) {
	testenv.CheckGoroutines(t)
	// b's port, owned by the test until b comes to life.
	bln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	bAddr := bln.Addr().(*net.TCPAddr).AddrPort()
	bln.Close()
	a := testenv.StartBackend(t, tagEcho('a'))
	res := newResolver(true)
	res.set("svc", a.Addr, bAddr)
	s := newServer(t, res, nil)
	s.init()
	clock := testenv.NewClock()
	s.health.now = clock.Now
	if err := s.Apply(context.Background(), "c1", "", map[uint16]string{6000: "svc"}); err != nil {
		t.Fatal(err)
	}
	addr := proxyAddr(t, s, "c1")
	reach := func() byte {
		c := dialPort(t, addr, 6000)
		defer c.Close()
		return readTag(t, c)
	}

	// b is dead: once it has failed, the clock standing still, it is never
	// dialled again while a answers.
	for i := range 40 {
		if got := reach(); got != 'a' {
			t.Fatalf("connection %d reached %q; want a", i, got)
		}
	}
	st := s.Stats()
	if st.DialFailures[bAddr] != 1 || st.Failovers != 1 {
		t.Fatalf("after 40 connections: %d dial failures of b, %d failovers; want 1 and 1", st.DialFailures[bAddr], st.Failovers)
	}
	eps := s.Namespaces()[0].Routes[0].Endpoints
	if i := slices.IndexFunc(eps, func(e EndpointStatus) bool { return e.Addr == bAddr }); i < 0 || eps[i].Healthy {
		t.Errorf("status of b: %+v; want it in back-off", eps)
	}

	// b returns: once its back-off is over it gets its share again.
	bln, err = net.ListenTCP("tcp4", net.TCPAddrFromAddrPort(bAddr))
	if err != nil {
		t.Fatalf("reviving b on its old port: %v", err)
	}
	b := testenv.ServeBackend(t, bln, tagEcho('b'))
	clock.Advance(backoffMin)
	counts := map[byte]int{}
	for range 40 {
		counts[reach()]++
	}
	if counts['b'] == 0 || b.Accepted.Load() == 0 {
		t.Errorf("b back for 40 connections got none: %v", counts)
	}
	eps = s.Namespaces()[0].Routes[0].Endpoints
	for _, e := range eps {
		if !e.Healthy || e.Failures != 0 {
			t.Errorf("status after recovery: %+v; want all healthy", e)
		}
	}
}

// TestAllFailedStillTried: endpoints that all failed lately are still
// dialled, in order, by the next connection, so a service that comes back
// is reachable at once.
func TestAllFailedStillTried(t *testing.T) {
	testenv.CheckGoroutines(t)
	aAddr := freePort(t)
	res := newResolver(false)
	res.set("svc", freePort(t), aAddr)
	s := newServer(t, res, nil)
	if err := s.Apply(context.Background(), "c1", "", map[uint16]string{6000: "svc"}); err != nil {
		t.Fatal(err)
	}
	addr := proxyAddr(t, s, "c1")
	expectClosed(t, dialPort(t, addr, 6000), 10*time.Second)
	for _, e := range waitStatus(t, s) {
		if e.Healthy {
			t.Fatalf("endpoint %v healthy after failing", e)
		}
	}
	ln, err := net.ListenTCP("tcp4", net.TCPAddrFromAddrPort(aAddr))
	if err != nil {
		t.Fatalf("reviving a: %v", err)
	}
	testenv.ServeBackend(t, ln, tagEcho('a'))
	if got := readTag(t, dialPort(t, addr, 6000)); got != 'a' {
		t.Errorf("reached %q; want a", got)
	}
}

func waitStatus(t *testing.T, s *Server) []EndpointStatus {
	t.Helper()
	var eps []EndpointStatus
	waitFor(t, "endpoint status", func() bool {
		ns := s.Namespaces()
		if len(ns) == 0 || len(ns[0].Routes) == 0 {
			return false
		}
		eps = ns[0].Routes[0].Endpoints
		return len(eps) > 0 && !eps[len(eps)-1].Healthy
	})
	return eps
}

// The relay's dials are the daemon's own evidence, shared with the socket
// path's endpoint health: a refused dial confirms the endpoint dead there
// too, and an endpoint held dead there is dialled after the others.
func TestRelaySharesHealth(t *testing.T) {
	testenv.CheckGoroutines(t)
	tr := endpointhealth.New(endpointhealth.Config{
		Probe:  func(context.Context, netip.AddrPort) error { return nil },
		Logger: slog.New(slog.DiscardHandler),
	})
	dead := freePort(t)
	held := testenv.StartBackend(t, tagEcho('h'))
	a := testenv.StartBackend(t, tagEcho('a'))
	res := newResolver(false)
	res.set("svc", dead, held.Addr, a.Addr)
	s := newServer(t, res, func(s *Server) { s.Health = tr })
	if err := s.Apply(context.Background(), "c1", "", map[uint16]string{6000: "svc"}); err != nil {
		t.Fatal(err)
	}
	addr := proxyAddr(t, s, "c1")
	tr.Failed(held.Addr, errors.New("the socket path's probe failed"))
	for i := range 10 {
		c := dialPort(t, addr, 6000)
		got := readTag(t, c)
		c.Close()
		if got != 'a' {
			t.Fatalf("connection %d reached %q; want a: the refused endpoint is in back-off, the other held dead", i, got)
		}
	}
	if !tr.Dead(dead) {
		t.Errorf("the relay's refused dial did not confirm %v dead", dead)
	}
	if held.Accepted.Load() != 0 {
		t.Errorf("the endpoint held dead was dialled %d times while another answered", held.Accepted.Load())
	}
}
