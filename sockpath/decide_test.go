package sockpath

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/connectable/connectable/netns"
	"github.com/connectable/connectable/resolver"
)

// slowResolver answers like its fakeResolver, except that a name starting
// with "slow." is a name whose DNS servers never answer: its lookup waits
// for the caller's deadline.
type slowResolver struct {
	*fakeResolver
	mu       sync.Mutex
	inflight map[string]int
}

func newSlowResolver(f *fakeResolver) *slowResolver {
	return &slowResolver{fakeResolver: f, inflight: map[string]int{}}
}

func (s *slowResolver) Answer(ctx context.Context, svc string) (resolver.Answer, error) {
	if !strings.HasPrefix(svc, "slow.") {
		return s.fakeResolver.Answer(ctx, svc)
	}
	s.mu.Lock()
	s.inflight[svc]++
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.inflight[svc]--
		s.mu.Unlock()
	}()
	<-ctx.Done()
	return resolver.Answer{}, fmt.Errorf("%s: %w", svc, ctx.Err())
}

// pending returns how many slow names have a lookup in flight.
func (s *slowResolver) pending() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, c := range s.inflight {
		if c > 0 {
			n++
		}
	}
	return n
}

// A name whose DNS servers never answer delays only its own port: Apply
// returns at once, and the good port is on the socket path while the slow
// lookup is still pending.
func TestSlowNameDelaysOnlyItsPort(t *testing.T) {
	f := newFixtureStopped(t)
	slow := newSlowResolver(f.res)
	f.resolver = slow
	f.start()
	f.p.cfg.LookupTimeout = time.Hour // pending for the whole test; Close ends it
	b1 := startBackend(t, f.ns, "b1", "198.18.201.1:0")
	f.res.set("good", group(1, []netip.AddrPort{b1.addr}))

	start := time.Now()
	if err := f.p.Apply(context.Background(), "ns1", f.ns, map[uint16]string{6000: "slow.one", 6001: "good"}); err != nil {
		t.Fatal(err)
	}
	applied := time.Since(start)
	eventually(t, "the good port on the socket path", func() bool {
		for _, s := range f.p.Status() {
			if s.Port == 6001 && s.Family == "ipv4" {
				return s.Path == "socket"
			}
		}
		return false
	})
	served := time.Since(start)
	// The slow lookup may start after the good port is decided; it never
	// ends while the test runs.
	eventually(t, "the slow name's lookup in flight", func() bool { return slow.pending() == 1 })
	if slow.pending() != 1 {
		t.Fatalf("the slow name's lookup is not pending (%d in flight): the test proves nothing", slow.pending())
	}
	if s := f.serving(6000, "ipv4"); s.Path != "relay" || s.Why != whyDeciding {
		t.Errorf("the slow port: %+v; want the relay while it is decided", s)
	}
	if name, _ := mustDial(t, f.ns, "127.0.0.1:6001"); name != "b1" {
		t.Errorf("the good port reached %q; want b1", name)
	}
	t.Logf("Apply returned after %v; the good port was on the socket path %v after Apply began, the slow name's lookup still pending",
		applied.Round(time.Microsecond), served.Round(time.Microsecond))
}

// Every lookup has a deadline: past it, the port is the relay's, and says
// why.
func TestLookupDeadline(t *testing.T) {
	f := newFixtureStopped(t)
	f.resolver = newSlowResolver(f.res)
	f.start()
	f.p.cfg.LookupTimeout = 200 * time.Millisecond
	f.apply(map[uint16]string{6000: "slow.one"})
	if s := f.serving(6000, "ipv4"); s.Path != "relay" || !strings.Contains(s.Why, "resolving slow.one") || !strings.Contains(s.Why, "deadline exceeded") {
		t.Errorf("the slow port: %+v; want the relay, because the lookup ran out of time", s)
	}
}

// One tenant's 256 slow names stall no other tenant: while all their
// lookups are pending, another namespace's port is decided, and its answer
// refreshed when it expires.
func TestSlowTenantStallsNoOther(t *testing.T) {
	f := newFixtureStopped(t)
	slow := newSlowResolver(f.res)
	f.resolver = slow
	f.res.ttl = 200 * time.Millisecond
	f.start()
	f.p.cfg.LookupTimeout = time.Hour

	routes := map[uint16]string{}
	for i := range maxPortsPerNamespace {
		routes[uint16(10000+i)] = fmt.Sprintf("slow.%d", i)
	}
	if err := f.p.Apply(context.Background(), "tenant", f.ns, routes); err != nil {
		t.Fatal(err)
	}
	eventually(t, "every slow lookup of the tenant in flight", func() bool { return slow.pending() == maxPortsPerNamespace })

	other := netnsWithAddrs(t, "198.18.201.1/24", "198.18.201.2/24")
	b1 := startBackend(t, other, "b1", "198.18.201.1:0")
	b2 := startBackend(t, other, "b2", "198.18.201.2:0")
	f.res.set("moving", group(1, []netip.AddrPort{b1.addr}))
	if err := f.p.Apply(context.Background(), "other", other, map[uint16]string{6000: "moving"}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the other namespace's port decided", func() bool {
		name, _, _ := dial(other, "127.0.0.1:6000")
		return name == "b1"
	})
	f.res.set("moving", group(1, []netip.AddrPort{b2.addr}))
	eventually(t, "the other namespace's answer refreshed once it expired", func() bool {
		name, _, _ := dial(other, "127.0.0.1:6000")
		return name == "b2"
	})
	// A dead endpoint of the other namespace revives on its probe's
	// schedule.
	addr2 := b2.addr.String()
	b2.stop()
	eventually(t, "the other namespace's endpoint marked dead", func() bool {
		_, _, err := dial(other, "127.0.0.1:6000")
		return err != nil && len(f.p.k.(*Kernel).mustDead(t)) > 0
	})
	startBackend(t, other, "b2", addr2)
	eventually(t, "the other namespace's endpoint revived", func() bool {
		name, _, _ := dial(other, "127.0.0.1:6000")
		return name == "b2"
	})
	if n := slow.pending(); n != maxPortsPerNamespace {
		t.Errorf("%d of the tenant's slow lookups pending at the end; want all %d, or the test proves nothing", n, maxPortsPerNamespace)
	}
	for _, s := range f.p.Status() {
		if s.Key == "tenant" && (s.Path != "relay" || s.Why != whyDeciding) {
			t.Fatalf("a port of the tenant: %+v; want the relay while it is decided", s)
		}
	}
}

// countingListener accepts connections in ns on addr and counts them.
type countingListener struct {
	ln   net.Listener
	n    atomic.Int64
	wg   sync.WaitGroup
	addr netip.AddrPort
}

func countAccepts(t *testing.T, ns, addr string) *countingListener {
	t.Helper()
	c := &countingListener{}
	err := netns.Do(ns, func() error {
		var err error
		c.ln, err = net.Listen("tcp", addr)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	c.addr = netip.MustParseAddrPort(c.ln.Addr().String())
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		for {
			conn, err := c.ln.Accept()
			if err != nil {
				return
			}
			c.n.Add(1)
			conn.Close()
		}
	}()
	t.Cleanup(func() { c.ln.Close(); c.wg.Wait() })
	return c
}

// A route is not reachability: an endpoint the namespace has a route to
// but cannot connect to is left out of its table, and a port with no
// endpoint it can connect to stays on the relay; a port whose endpoints
// answer is on the socket path.
func TestRoutableButUnreachable(t *testing.T) {
	f := newFixture(t)
	hole, fill := blackholeIn(t, f.ns, "198.18.201.3")
	fill()
	b1 := startBackend(t, f.ns, "b1", "198.18.201.1:0")
	f.res.set("hole", group(1, []netip.AddrPort{hole}))
	f.res.set("mixed", group(1, []netip.AddrPort{b1.addr, hole}))
	f.res.set("good", group(1, []netip.AddrPort{b1.addr}))
	f.apply(map[uint16]string{6000: "hole", 6001: "mixed", 6002: "good"})
	if s := f.serving(6000, "ipv4"); s.Path != "relay" || !strings.Contains(s.Why, "cannot connect to endpoint "+hole.String()) {
		t.Errorf("port 6000: %+v; want the relay, because the namespace cannot connect to %s", s, hole)
	}
	if s := f.serving(6001, "ipv4"); s.Path != "socket" || !slices.Equal(s.Endpoints, []netip.AddrPort{b1.addr}) ||
		!strings.Contains(s.Why, "cannot connect to them: "+hole.String()) {
		t.Errorf("port 6001: %+v; want the socket path with %s alone, %s left out", s, b1.addr, hole)
	}
	for range 20 {
		if name, _, err := dialTimeout(f.ns, "127.0.0.1:6001", 2*time.Second); err != nil || name != "b1" {
			t.Fatalf("127.0.0.1:6001: %q, %v; want b1 every time", name, err)
		}
	}
	if s := f.serving(6002, "ipv4"); s.Path != "socket" {
		t.Errorf("port 6002: %+v; want the socket path", s)
	}
	if _, _, err := dialTimeout(f.ns, "127.0.0.1:6000", 200*time.Millisecond); err == nil {
		t.Errorf("127.0.0.1:6000 connected; with no relay in this test, nothing should listen there")
	}
}

// A namespace's verdict on an endpoint is checked once and kept; unverify
// makes the next decision check again.
func TestReachVerdictCached(t *testing.T) {
	f := newFixture(t)
	c := countAccepts(t, f.ns, "198.18.201.1:0")
	f.res.set("one", group(1, []netip.AddrPort{c.addr}))
	f.apply(map[uint16]string{6000: "one", 6001: "one"})
	eventually(t, "the reach check's connection accepted", func() bool { return c.n.Load() >= 1 })
	time.Sleep(100 * time.Millisecond)
	if n := c.n.Load(); n != 1 {
		t.Errorf("%d connections for the first decision of two ports naming one service; want 1, the check", n)
	}
	f.p.reconverge(func(*space) bool { return true })
	time.Sleep(100 * time.Millisecond)
	if n := c.n.Load(); n != 1 {
		t.Errorf("%d connections after deciding again; want the verdict kept, no new check", n)
	}
	cookie, err := NetNSCookie(f.ns)
	if err != nil {
		t.Fatal(err)
	}
	f.p.mu.Lock()
	f.p.unverify(cookie, c.addr)
	f.p.mu.Unlock()
	f.p.reconverge(func(*space) bool { return true })
	eventually(t, "a new check after unverify", func() bool { return c.n.Load() == 2 })
	if s := f.serving(6000, "ipv4"); s.Path != "socket" {
		t.Errorf("after the new check: %+v; want the socket path", s)
	}
}

// fakePorts says that one endpoint is a published port of a container.
type fakePorts struct {
	published netip.AddrPort
	direct    Direct
}

func (p *fakePorts) Direct(_ context.Context, ep netip.AddrPort) ([]Direct, error) {
	if ep == p.published {
		return []Direct{p.direct}, nil
	}
	return nil, nil
}
func (p *fakePorts) Refresh(context.Context) error { return nil }
func (p *fakePorts) Changed() <-chan struct{}      { return nil }

// A published port is translated to its container's address only for a
// client on the container's network where containers may reach each
// other; otherwise the published endpoint itself is written.
func TestPublishedPortTranslation(t *testing.T) {
	for _, isolated := range []bool{false, true} {
		t.Run(fmt.Sprintf("isolated=%v", isolated), func(t *testing.T) {
			f := newFixtureStopped(t)
			pub := startBackend(t, f.ns, "pub", "198.18.201.4:0")
			own := startBackend(t, f.ns, "own", "198.18.201.1:0")
			f.ports = &fakePorts{published: pub.addr, direct: Direct{Addr: own.addr, Subnet: netip.MustParsePrefix("198.18.201.0/24"), Isolated: isolated}}
			f.start()
			f.res.set("web", group(1, []netip.AddrPort{pub.addr}))
			f.apply(map[uint16]string{6000: "web"})
			want, name := own.addr, "own"
			if isolated {
				want, name = pub.addr, "pub"
			}
			if s := f.serving(6000, "ipv4"); s.Path != "socket" || len(s.Endpoints) != 1 || s.Endpoints[0] != want {
				t.Errorf("%+v; want the socket path choosing %s", s, want)
			}
			if got, _ := mustDial(t, f.ns, "127.0.0.1:6000"); got != name {
				t.Errorf("reached %q; want %q", got, name)
			}
		})
	}
}

// An answer with more endpoints than the socket path checks stays on the
// relay, and says why.
func TestAnswerEndpointsCap(t *testing.T) {
	f := newFixture(t)
	var eps []netip.AddrPort
	for i := range maxAnswerEndpoints + 1 {
		eps = append(eps, netip.AddrPortFrom(netip.MustParseAddr("198.18.201.1"), uint16(20000+i)))
	}
	f.res.set("big", group(1, eps))
	f.apply(map[uint16]string{6000: "big"})
	if s := f.serving(6000, "ipv4"); s.Path != "relay" || !strings.Contains(s.Why, fmt.Sprintf("has %d endpoints", maxAnswerEndpoints+1)) {
		t.Errorf("%+v; want the relay, because the answer has more than %d endpoints", s, maxAnswerEndpoints)
	}
}

// The schedule of a service's decisions: on the socket path, when the
// answer expires (never sooner than refreshMin); on the relay, a back-off
// that starts at 1s for a name that does not resolve and at recheckMin
// otherwise, doubles while nothing changes, and starts over when the
// reason does.
func TestScheduleNext(t *testing.T) {
	now := time.Unix(1000, 0)
	var s schedule
	steps := []struct {
		o    outcome
		want time.Duration
	}{
		{outcome{unresolved: true, reason: "a"}, time.Second},
		{outcome{unresolved: true, reason: "b"}, 2 * time.Second},
		{outcome{unresolved: true, reason: "c"}, 4 * time.Second},
		{outcome{reason: "no route"}, recheckMin},
		{outcome{reason: "no route"}, 2 * recheckMin},
		{outcome{reason: "cannot connect"}, recheckMin},
		{outcome{socket: true, expires: now.Add(time.Hour)}, time.Hour},
		{outcome{socket: true, expires: now.Add(time.Millisecond)}, refreshMin},
		{outcome{reason: "cannot connect"}, recheckMin},
	}
	for i := range 8 {
		steps = append(steps, struct {
			o    outcome
			want time.Duration
		}{outcome{reason: "cannot connect"}, min(recheckMin<<(i+1), recheckMax)})
	}
	for i, st := range steps {
		s.next(st.o, now)
		if got := s.due.Sub(now); got != st.want {
			t.Errorf("step %d (%+v): next decision in %v; want %v", i, st.o, got, st.want)
		}
	}
}

func (k *Kernel) mustDead(t *testing.T) []netip.AddrPort {
	t.Helper()
	dead, err := k.deadEndpoints()
	if err != nil {
		t.Fatal(err)
	}
	return dead
}
