package proxy

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
)

// TestRefusedTargetSkipped: a refused endpoint is skipped for the next one
// without a dial, counted, logged once per namespace, shown in the status,
// and never put in back-off.
func TestRefusedTargetSkipped(t *testing.T) {
	testenv.CheckGoroutines(t)
	a := testenv.StartBackend(t, tagEcho('a'))
	refused := netip.MustParseAddrPort("127.0.0.2:9")
	res := newResolver(false)
	res.set("svc", refused, a.Addr)
	logs := &testenv.SyncBuffer{}
	s := newServer(t, res, func(s *Server) {
		s.DenyTargets = []netip.Prefix{netip.MustParsePrefix("127.0.0.2/32")}
		s.Logger = testenv.Logger(t, logs)
	})
	if err := s.Apply(context.Background(), "c1", "", map[uint16]string{6000: "svc"}); err != nil {
		t.Fatal(err)
	}
	addr := proxyAddr(t, s, "c1")
	for range 3 {
		c := dialPort(t, addr, 6000)
		if got := readTag(t, c); got != 'a' {
			t.Fatalf("reached %q; want a", got)
		}
		c.Close()
	}
	st := s.Stats()
	if got := st.Services["svc"].Refused; got != 3 {
		t.Errorf("refused: got %d; want 3", got)
	}
	if st.DialFailures[refused] != 0 || st.Failovers != 0 {
		t.Errorf("dial failures of the refused endpoint %d, failovers %d; want 0 and 0", st.DialFailures[refused], st.Failovers)
	}
	if n := logs.Count("endpoint refused by the target policy"); n != 1 {
		t.Errorf("%d log lines about the refusal; want 1", n)
	}
	eps := s.Namespaces()[0].Routes[0].Endpoints
	if len(eps) != 2 || !eps[0].Refused || eps[0].Failures != 0 || !strings.Contains(eps[0].LastError, "--deny-targets 127.0.0.2/32") {
		t.Errorf("status: %+v; want the first refused, naming the rule, without failures", eps)
	}
	if eps[1].Refused || !eps[1].Healthy {
		t.Errorf("status of a: %+v", eps[1])
	}
}

// TestTargetPolicyDefaultRefusesLoopback: without AllowTargets, a backend
// on loopback is never connected to.
func TestTargetPolicyDefaultRefusesLoopback(t *testing.T) {
	testenv.CheckGoroutines(t)
	a := testenv.StartBackend(t, tagEcho('a'))
	res := newResolver(false)
	res.set("svc", a.Addr)
	s := newServer(t, res, func(s *Server) { s.AllowTargets = nil })
	if err := s.Apply(context.Background(), "c1", "", map[uint16]string{6000: "svc"}); err != nil {
		t.Fatal(err)
	}
	expectClosed(t, dialPort(t, proxyAddr(t, s, "c1"), 6000), 10*time.Second)
	waitFor(t, "the connection to fail", func() bool { return s.Stats().Services["svc"].Failed == 1 })
	if n := a.Accepted.Load(); n != 0 {
		t.Errorf("the loopback backend accepted %d connections", n)
	}
	// The dialer's own check, for a Dial that bypasses dialEndpoint's.
	if err := s.policy.control("tcp4", a.Addr.String(), nil); !errors.Is(err, ErrTargetRefused) {
		t.Errorf("control(%s): %v; want refused", a.Addr, err)
	}
}

func TestLocalDialError(t *testing.T) {
	for _, errno := range []syscall.Errno{syscall.EADDRNOTAVAIL, syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS} {
		if !localDialError(&wrapErr{errno}) {
			t.Errorf("%v: not a local error", errno)
		}
	}
	for _, errno := range []syscall.Errno{syscall.ECONNREFUSED, syscall.ETIMEDOUT, syscall.EHOSTUNREACH} {
		if localDialError(&wrapErr{errno}) {
			t.Errorf("%v: a local error", errno)
		}
	}
}

type wrapErr struct{ err error }

func (e *wrapErr) Error() string { return "dial tcp: " + e.err.Error() }
func (e *wrapErr) Unwrap() error { return e.err }
