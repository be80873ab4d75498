package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
)

// gate blocks a Redirector's Apply for one namespace until released, as an
// xtables lock held elsewhere or a tenant's huge OUTPUT chain would.
type gate struct {
	netns    string
	entered  chan struct{} // closed when the Apply for netns is blocked
	released chan struct{} // closed to let it go on
	once     sync.Once
}

func newGate(netns string) *gate {
	return &gate{netns: netns, entered: make(chan struct{}), released: make(chan struct{})}
}

func (g *gate) wait(netns string) {
	if netns != g.netns {
		return
	}
	g.once.Do(func() { close(g.entered) })
	<-g.released
}

func (g *gate) release() {
	select {
	case <-g.released:
	default:
		close(g.released)
	}
}

// gatedRedirector is r behind g.
type gatedRedirector struct {
	Redirector
	g *gate
}

func (r gatedRedirector) Apply(netns string, ports []uint16, toPort uint16) error {
	r.g.wait(netns)
	return r.Redirector.Apply(netns, ports, toPort)
}

// within runs fn and fails the test unless it returns within a generous
// bound; it returns how long fn took.
func within(t *testing.T, what string, fn func()) time.Duration {
	t.Helper()
	done := make(chan time.Duration, 1)
	go func() {
		start := time.Now()
		fn()
		done <- time.Since(start)
	}()
	select {
	case d := <-done:
		return d
	case <-time.After(10 * time.Second):
		t.Fatalf("%s did not return while another namespace's set-up was stuck", what)
		return 0
	}
}

// TestNamespaceNeverWaitsForAnother runs the real path (listeners opened
// inside fresh namespaces, iptables rules, clients dialling in) with the
// rules of one namespace stuck: every other namespace is set up and
// served, Stats and Namespaces answer, and calls for the stuck key give up
// with their context; Close waits for the stuck call and then tears its
// namespace down too.
func TestNamespaceNeverWaitsForAnother(t *testing.T) {
	testenv.NeedRoot(t)
	testenv.NeedCommand(t, "iptables", "ip6tables", "nsenter")
	testenv.CheckGoroutines(t)
	testenv.GuardRootRules(t)
	slow, fast := testenv.NewNetNS(t), testenv.NewNetNS(t)
	checkFDs(t)

	be := testenv.StartBackend(t, tagEcho('a'))
	res := newResolver(false)
	res.set("a.service", be.Addr)
	g := newGate(slow)
	t.Cleanup(g.release) // before the server's Close, if the test fails early
	s := &Server{Resolver: res, AllowTargets: loopbackTargets, Redirector: gatedRedirector{execRedirector{t}, g}, Logger: testLogger(t, -4)}
	closed := make(chan error, 1)
	closeOnce := sync.OnceFunc(func() { closed <- s.Close() })
	t.Cleanup(func() {
		g.release()
		closeOnce()
		if err := <-closed; err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	routes := map[uint16]string{6000: "a.service"}
	ctx := context.Background()

	stuck := make(chan error, 1)
	go func() { stuck <- s.Apply(ctx, "slow", slow, routes) }()
	<-g.entered
	stillStuck := func(when string) {
		t.Helper()
		select {
		case err := <-stuck:
			t.Fatalf("%s: the stuck Apply returned (%v); the test's premise is gone", when, err)
		default:
		}
	}

	d := within(t, "Apply of another namespace", func() {
		if err := s.Apply(ctx, "fast", fast, routes); err != nil {
			t.Errorf("Apply of another namespace: %v", err)
		}
	})
	t.Logf("other namespace set up in %v", d)
	c, err := dialIn(t, fast, "tcp", "localhost:6000")
	if err != nil {
		t.Fatalf("dialing localhost:6000 in the other namespace: %v", err)
	}
	if got := readTag(t, c); got != 'a' {
		t.Fatalf("reached backend %q; want a", got)
	}
	roundTrip(t, c, "served while another namespace is stuck")

	var st Stats
	var nss []NamespaceStatus
	d = within(t, "Stats and Namespaces", func() {
		st = s.Stats()
		nss = s.Namespaces()
	})
	// They returned while the set-up is stuck, which is the point. They
	// take microseconds (BenchmarkStatsWhileSetUpStuck); the bound only
	// tells a slow machine from a stall like the 10 s xtables wait.
	t.Logf("Stats and Namespaces took %v", d)
	if d > time.Second {
		t.Errorf("Stats and Namespaces took %v while another namespace's set-up was stuck", d)
	}
	if st.Namespaces["fast"] != 1 || len(nss) != 1 || nss[0].Key != "fast" || nss[0].Active != 1 {
		t.Errorf("while slow is stuck: stats %v, namespaces %+v; want fast only, one connection", st.Namespaces, nss)
	}
	stillStuck("after serving the other namespace")

	// Calls for the stuck key wait for it, and give up with their context.
	short, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	if err := s.Apply(short, "slow", slow, routes); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Apply behind the stuck one: got %v; want the context's deadline", err)
	}
	gone, cancelGone := context.WithCancel(ctx)
	cancelGone()
	if err := s.Remove(gone, "slow"); !errors.Is(err, context.Canceled) {
		t.Errorf("Remove with a cancelled context behind the stuck Apply: got %v; want context.Canceled", err)
	}
	stillStuck("after the calls that gave up")

	// Close waits for the call in flight, refuses new ones meanwhile, and
	// then removes both namespaces.
	c.Close()
	go closeOnce()
	<-s.closing
	if err := s.Apply(ctx, "late", fast, routes); !errors.Is(err, ErrServerClosed) {
		t.Errorf("Apply while Close waits: got %v; want ErrServerClosed", err)
	}
	select {
	case err := <-closed:
		t.Fatalf("Close returned (%v) while an Apply was in flight", err)
	case <-time.After(100 * time.Millisecond):
	}
	g.release()
	if err := <-stuck; err != nil {
		t.Errorf("the stuck Apply, released: %v", err)
	}
	if err := <-closed; err != nil {
		t.Errorf("Close: %v", err)
	}
	closed <- nil // for the cleanup
	for _, ns := range []string{slow, fast} {
		if out := testenv.Exec(t, ns, "iptables", "-t", "nat", "-S"); strings.Contains(out, testChain) {
			t.Errorf("rules left in %s after Close:\n%s", ns, out)
		}
		if out := testenv.Exec(t, ns, "ss", "-ltnH"); strings.TrimSpace(out) != "" {
			t.Errorf("listeners left in %s after Close:\n%s", ns, out)
		}
	}
}

// TestApplyContextEndsMidway: an Apply whose context ends while its rules
// are being written leaves nothing behind, and says why.
func TestApplyContextEndsMidway(t *testing.T) {
	testenv.CheckGoroutines(t)
	checkFDs(t)
	g := newGate("ns")
	t.Cleanup(g.release)
	red := &fakeRedirector{}
	var opened []netip.AddrPort
	s := newServer(t, newResolver(false), func(s *Server) {
		s.Redirector = gatedRedirector{red, g}
		s.Listen = func(netns string, port uint16) (v4, v6 *net.TCPListener, err error) {
			v4, v6, err = loopListen(netns, port)
			if err == nil {
				opened = append(opened, v4.Addr().(*net.TCPAddr).AddrPort())
			}
			return v4, v6, err
		}
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Apply(ctx, "c1", "ns", map[uint16]string{6000: "svc"}) }()
	<-g.entered
	cancel()
	g.release()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Apply whose context ended: got %v; want context.Canceled", err)
	}
	if ns := s.Namespaces(); len(ns) != 0 {
		t.Errorf("namespaces after the cancelled Apply: %+v", ns)
	}
	if got, want := red.log(), []string{fmt.Sprintf("apply ns [6000] %d", opened[0].Port()), "clear ns"}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("redirector calls: got %q; want %q", got, want)
	}
	if _, err := net.Dial("tcp4", opened[0].String()); !isRefused(err) {
		t.Errorf("dial to the cancelled namespace's listener: got %v; want connection refused", err)
	}
	// Nothing is held: the key can be applied at once.
	if err := s.Apply(context.Background(), "c1", "ns", map[uint16]string{6000: "svc"}); err != nil {
		t.Fatal(err)
	}
}

// BenchmarkStatsWhileSetUpStuck times Stats and Namespaces, as /metrics and
// /status call them, while one namespace's set-up is stuck in its rules and
// ten others are applied. The target is well under 100 ms.
func BenchmarkStatsWhileSetUpStuck(b *testing.B) {
	g := newGate("stuck")
	s := newServer(b, newResolver(false), func(s *Server) {
		s.Redirector = gatedRedirector{&fakeRedirector{}, g}
		s.Logger = testLogger(b, slog.LevelWarn)
	})
	ctx := context.Background()
	for i := range 10 {
		if err := s.Apply(ctx, fmt.Sprint("c", i), fmt.Sprint("ns", i), map[uint16]string{6000: "svc"}); err != nil {
			b.Fatal(err)
		}
	}
	stuck := make(chan error, 1)
	go func() { stuck <- s.Apply(ctx, "stuck", "stuck", map[uint16]string{6000: "svc"}) }()
	<-g.entered
	for b.Loop() {
		if len(s.Stats().Namespaces) != 10 || len(s.Namespaces()) != 10 {
			b.Fatal("namespaces missing")
		}
	}
	b.StopTimer()
	g.release()
	if err := <-stuck; err != nil {
		b.Fatal(err)
	}
}
