package sockpath

import (
	"context"
	"fmt"
	"math"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/connectable/connectable/internal/testenv"
	"github.com/connectable/connectable/netns"
)

// fixture is a loaded socket path and a client namespace whose dummy
// interface holds the backends' addresses 198.18.201.1-4.
type fixture struct {
	t    *testing.T
	dir  string
	ns   string
	res  *fakeResolver
	p    *Path
	logs *testenv.SyncBuffer
	// resolver, if set before start, answers in place of res.
	resolver Resolver
	// ports, if set before start, is the Path's Ports.
	ports Ports
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	f := newFixtureStopped(t)
	f.start()
	return f
}

// newFixtureStopped is newFixture without the Path, for a test to
// configure first.
func newFixtureStopped(t *testing.T) *fixture {
	t.Helper()
	f := &fixture{t: t, dir: bpffs(t), res: newFakeResolver(time.Hour), logs: &testenv.SyncBuffer{}}
	f.ns = netnsWithAddrs(t, "198.18.201.1/24", "198.18.201.2/24", "198.18.201.3/24", "198.18.201.4/24", "fd00:201::1/64")
	return f
}

// start loads the kernel side (adopting pins) and a Path over it.
func (f *fixture) start() {
	f.t.Helper()
	k := loadKernel(f.t, f.dir)
	// The backends live in the client's namespace; it stands in for the
	// daemon's own, from which probes dial.
	var res Resolver = f.res
	if f.resolver != nil {
		res = f.resolver
	}
	p, err := New(Config{Kernel: k, Resolver: res, Ports: f.ports, RetryMin: 50 * time.Millisecond, RetryMax: 200 * time.Millisecond,
		ProbeNetNS: f.ns, Logger: testenv.Logger(f.t, f.logs)})
	if err != nil {
		k.Remove()
		f.t.Fatal(err)
	}
	f.p = p
	f.t.Cleanup(func() {
		if f.p == p {
			if err := p.Close(); err != nil {
				f.t.Errorf("Close: %v", err)
			}
			if left := pinsLeft(f.dir); len(left) > 0 {
				f.t.Errorf("pins left after Close: %v", left)
			}
		}
	})
}

// apply applies routes to the namespace ns1 and waits for every port's
// first decision: Apply itself decides nothing.
func (f *fixture) apply(routes map[uint16]string) {
	f.t.Helper()
	if err := f.p.Apply(context.Background(), "ns1", f.ns, routes); err != nil {
		f.t.Fatalf("Apply: %v", err)
	}
	f.settle("ns1")
}

// settle waits until no port of the namespace key waits for its decision.
func (f *fixture) settle(key string) {
	f.t.Helper()
	eventually(f.t, "every port of "+key+" decided", func() bool {
		for _, s := range f.p.Status() {
			if s.Key == key && s.Why == whyDeciding {
				return false
			}
		}
		return true
	})
}

func (f *fixture) serving(port uint16, family string) Serving {
	f.t.Helper()
	for _, s := range f.p.Status() {
		if s.Port == port && s.Family == family {
			return s
		}
	}
	f.t.Fatalf("port %d (%s) not in Status: %+v", port, family, f.p.Status())
	return Serving{}
}

func TestRewriteAndPeerName(t *testing.T) {
	f := newFixture(t)
	b1 := startBackend(t, f.ns, "b1", "198.18.201.1:0")
	b6 := startBackend(t, f.ns, "b6", "[fd00:201::1]:0")
	f.res.set("one", group(1, []netip.AddrPort{b1.addr}))
	f.res.set("six", group(1, []netip.AddrPort{b6.addr}))
	f.apply(map[uint16]string{6000: "one", 6001: "six"})

	// Nothing listens on the namespace's loopback: only a rewrite can
	// answer. Each family's table holds only that family's endpoints.
	for _, addr := range []string{"127.0.0.1:6000", "127.0.0.2:6000", "[::1]:6001"} {
		name, peer := mustDial(t, f.ns, addr)
		if want := map[bool]string{false: "b1", true: "b6"}[strings.HasPrefix(addr, "[")]; name != want {
			t.Errorf("%s answered by %q; want %s", addr, name, want)
		}
		if peer != addr {
			t.Errorf("getpeername after connecting to %s = %s; want the address connected to", addr, peer)
		}
	}
	for _, tc := range []struct {
		port   uint16
		family string
		ep     netip.AddrPort
	}{{6000, "ipv4", b1.addr}, {6001, "ipv6", b6.addr}} {
		if s := f.serving(tc.port, tc.family); s.Path != "socket" || len(s.Endpoints) != 1 || s.Endpoints[0] != tc.ep {
			t.Errorf("Status %d %s = %+v; want the socket path choosing from %s", tc.port, tc.family, s, tc.ep)
		}
	}
	for _, tc := range []struct {
		port   uint16
		family string
		addr   string
	}{{6000, "ipv6", "[::1]:6000"}, {6001, "ipv4", "127.0.0.1:6001"}} {
		if s := f.serving(tc.port, tc.family); s.Path != "relay" || !strings.Contains(s.Why, "and the connect") {
			t.Errorf("Status %d %s = %+v; want the relay: the endpoint is of the other family", tc.port, tc.family, s)
		}
		if _, _, err := dial(f.ns, tc.addr); err == nil {
			t.Errorf("%s connected; an endpoint of the other family must not be written into its table", tc.addr)
		}
	}
	// A port without a route is not touched.
	if _, _, err := dial(f.ns, "127.0.0.1:6002"); err == nil {
		t.Errorf("127.0.0.1:6002 connected; it has no route and nothing listens there")
	}

	cs, err := f.p.Counters()
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]uint64{"one " + b1.addr.String(): 2, "six " + b6.addr.String(): 1}
	for _, c := range cs {
		k := c.Service + " " + c.Endpoint.String()
		if c.Connects != want[k] || c.Failures != 0 {
			t.Errorf("Counters: %+v; want %d connects", c, want[k])
		}
		delete(want, k)
	}
	if len(want) > 0 {
		t.Errorf("Counters = %+v; missing %v", cs, want)
	}

	if err := f.p.Remove(context.Background(), "ns1"); err != nil {
		t.Fatal(err)
	}
	if _, _, err := dial(f.ns, "127.0.0.1:6000"); err == nil {
		t.Errorf("127.0.0.1:6000 still rewritten after Remove")
	}
}

// Namespaces not in the map, the host's among them, are never rewritten,
// even on a port routed for another namespace.
func TestOtherNamespacesUntouched(t *testing.T) {
	f := newFixture(t)
	b1 := startBackend(t, f.ns, "b1", "198.18.201.1:0")
	f.res.set("one", group(1, []netip.AddrPort{b1.addr}))

	host := startBackend(t, "/proc/self/ns/net", "host", "127.0.0.1:0")
	port := host.addr.Port()
	other := testenv.NewNetNS(t)
	startBackend(t, other, "other", fmt.Sprintf("127.0.0.1:%d", port))
	f.apply(map[uint16]string{port: "one"})

	addr := fmt.Sprintf("127.0.0.1:%d", port)
	if name, _ := mustDial(t, f.ns, addr); name != "b1" {
		t.Fatalf("the routed namespace reached %q; want b1", name)
	}
	if name, peer := mustDial(t, "/proc/self/ns/net", addr); name != "host" || peer != addr {
		t.Errorf("the host's namespace reached %q (peer %s); want its own listener at %s", name, peer, addr)
	}
	if name, _ := mustDial(t, other, addr); name != "other" {
		t.Errorf("a namespace not in the map reached %q; want its own listener", name)
	}
}

func TestWeights(t *testing.T) {
	f := newFixture(t)
	var eps []netip.AddrPort
	for i := 1; i <= 3; i++ {
		eps = append(eps, startBackend(t, f.ns, fmt.Sprintf("b%d", i), fmt.Sprintf("198.18.201.%d:0", i)).addr)
	}
	// Weights 1:2:7, plus a weight-0 target that must never be chosen
	// while the weighted ones live.
	g := group(1, eps, 1, 2, 7)
	b4 := startBackend(t, f.ns, "b4", "198.18.201.4:0")
	g.Targets = append(g.Targets, group(1, []netip.AddrPort{b4.addr}, 0).Targets...)
	f.res.set("w", g)
	f.apply(map[uint16]string{6000: "w"})

	const n = 3000
	counts := map[string]int{}
	for range n {
		name, _ := mustDial(t, f.ns, "127.0.0.1:6000")
		counts[name]++
	}
	want := map[string]float64{"b1": 0.1, "b2": 0.2, "b3": 0.7}
	for name, p := range want {
		// Five standard deviations of a binomial count: a correct
		// implementation fails this once in millions of runs.
		sd := math.Sqrt(n * p * (1 - p))
		if got := float64(counts[name]); math.Abs(got-n*p) > 5*sd {
			t.Errorf("%s served %v of %d connects; want %v ± %.0f (weights 1:2:7)", name, got, n, n*p, 5*sd)
		}
	}
	if counts["b4"] != 0 {
		t.Errorf("the weight-0 target served %d connects while weighted ones were live", counts["b4"])
	}
}

func TestPriorityAndDeadEndpoint(t *testing.T) {
	f := newFixture(t)
	b1 := startBackend(t, f.ns, "b1", "198.18.201.1:0")
	b2 := startBackend(t, f.ns, "b2", "198.18.201.2:0")
	b3 := startBackend(t, f.ns, "b3", "198.18.201.3:0")
	f.res.set("p", group(1, []netip.AddrPort{b1.addr, b2.addr}), group(2, []netip.AddrPort{b3.addr}))
	f.apply(map[uint16]string{6000: "p"})
	for range 50 {
		if name, _ := mustDial(t, f.ns, "127.0.0.1:6000"); name == "b3" {
			t.Fatalf("priority 2 served while priority 1 was live")
		}
	}

	// b1 dies. The first connect to it fails (the application's own,
	// there is no proxy to retry), and takes b1 out of the table.
	addr1 := b1.addr.String()
	b1.stop()
	killed := time.Now()
	var firstFailure, lastFailure time.Time
	var rewritten time.Duration
	failures := 0
	for range 200 {
		name, _, err := dial(f.ns, "127.0.0.1:6000")
		if err != nil {
			failures++
			lastFailure = time.Now()
			if firstFailure.IsZero() {
				firstFailure = lastFailure
				for {
					if eps := f.serving(6000, "ipv4").Endpoints; len(eps) == 1 && eps[0] == b2.addr {
						break
					}
					if time.Since(firstFailure) > 10*time.Second {
						t.Fatal("b1 never left the table")
					}
					time.Sleep(100 * time.Microsecond)
				}
				rewritten = time.Since(firstFailure)
			}
		} else if name != "b2" {
			t.Fatalf("connect answered by %q; want b2 while b1 is dead", name)
		}
	}
	if failures > 1 {
		t.Errorf("%d connects failed after b1 died; want at most the one that found it dead", failures)
	}
	if failures == 1 {
		// A measurement for the record, not a bound: the machine may be
		// loaded. The kernel's mark took effect before the failed connect
		// returned; this is when the daemon's rewrite was seen.
		t.Logf("b1 killed: %d of 200 connects failed, the last %v after the kill; the table was rewritten without it %v after the failure",
			failures, lastFailure.Sub(killed).Round(time.Microsecond), rewritten.Round(time.Microsecond))
		if !strings.Contains(f.logs.String(), "endpoint taken out of the socket path") {
			t.Errorf("no log line names the dead endpoint:\n%s", f.logs)
		}
	}

	// b2 dies too: priority 2 takes over.
	b2.stop()
	eventually(t, "priority 2 serves once priority 1 is dead", func() bool {
		name, _, _ := dial(f.ns, "127.0.0.1:6000")
		return name == "b3"
	})

	// b1 comes back on its address: a probe finds it and priority 1
	// serves again.
	startBackend(t, f.ns, "b1", addr1)
	eventually(t, "b1 serves again after a probe", func() bool {
		name, _, _ := dial(f.ns, "127.0.0.1:6000")
		return name == "b1"
	})
}

// No connect sees a half-written table: every one of them reaches a
// backend of the old set or the new one while the sets alternate.
func TestReplaceWhileConnecting(t *testing.T) {
	f := newFixture(t)
	var sets [2][]netip.AddrPort
	for i := 1; i <= 4; i++ {
		b := startBackend(t, f.ns, fmt.Sprintf("b%d", i), fmt.Sprintf("198.18.201.%d:0", i))
		sets[(i-1)%2] = append(sets[(i-1)%2], b.addr)
	}
	f.res.set("r", group(1, sets[0]))
	f.apply(map[uint16]string{6000: "r"})

	var failed atomic.Int64
	var done atomic.Bool
	var wg sync.WaitGroup
	seen := make([]map[string]int, 2)
	for w := range 2 {
		seen[w] = map[string]int{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !done.Load() {
				name, _, err := dial(f.ns, "127.0.0.1:6000")
				if err != nil {
					failed.Add(1)
					continue
				}
				seen[w][name]++
			}
		}()
	}
	for i := range 200 {
		f.res.set("r", group(1, sets[(i+1)%2]))
		f.p.reconverge(func(*space) bool { return true })
	}
	done.Store(true)
	wg.Wait()
	if n := failed.Load(); n > 0 {
		t.Errorf("%d connects failed while the endpoint set was replaced", n)
	}
	total := map[string]int{}
	for _, m := range seen {
		for k, v := range m {
			total[k] += v
		}
	}
	for k := range total {
		if !strings.HasPrefix(k, "b") {
			t.Errorf("a connect reached %q", k)
		}
	}
	t.Logf("answers while replacing: %v", total)
}

// What the namespace cannot reach stays on the relay: the route is not
// written, so the connect goes where it would without the socket path.
func TestUnreachableStaysOnRelay(t *testing.T) {
	f := newFixture(t)
	// The REDIRECT rule's stand-in: what the connect reaches unrewritten.
	for _, port := range []string{"6000", "6001", "6002"} {
		startBackend(t, f.ns, "relay", "127.0.0.1:"+port)
	}
	f.res.set("hostloop", group(1, []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:8500")}))
	f.res.set("noroute", group(1, []netip.AddrPort{netip.MustParseAddrPort("198.18.202.1:80")}))
	f.apply(map[uint16]string{6000: "hostloop", 6001: "noroute", 6002: "missing"})
	for port, why := range map[uint16]string{6000: "loopback", 6001: "no route", 6002: "resolving"} {
		s := f.serving(port, "ipv4")
		if s.Path != "relay" || !strings.Contains(s.Why, why) {
			t.Errorf("port %d: %+v; want the relay, because of %q", port, s, why)
		}
		if name, _ := mustDial(t, f.ns, fmt.Sprintf("127.0.0.1:%d", port)); name != "relay" {
			t.Errorf("port %d reached %q; want the relay", port, name)
		}
	}
	if !strings.Contains(f.logs.String(), "path=relay") {
		t.Errorf("no log line says the relay serves:\n%s", f.logs)
	}
}

// A crashed daemon's entries keep serving; the next run adopts them and
// converges to exactly what it is asked for.
func TestAdoptAfterCrash(t *testing.T) {
	f := newFixture(t)
	b1 := startBackend(t, f.ns, "b1", "198.18.201.1:0")
	b2 := startBackend(t, f.ns, "b2", "198.18.201.2:0")
	f.res.set("one", group(1, []netip.AddrPort{b1.addr}))
	f.res.set("two", group(1, []netip.AddrPort{b2.addr}))
	f.apply(map[uint16]string{6000: "one", 6001: "two"})
	other := netnsWithAddrs(t, "198.18.201.1/24")
	if err := f.p.Apply(context.Background(), "ns2", other, map[uint16]string{6000: "one"}); err != nil {
		t.Fatal(err)
	}
	f.settle("ns2")

	if err := f.p.Abandon(); err != nil { // what SIGKILL leaves
		t.Fatal(err)
	}
	if name, _ := mustDial(t, f.ns, "127.0.0.1:6001"); name != "b2" {
		t.Fatalf("with no daemon, 127.0.0.1:6001 reached %q; want b2", name)
	}

	f.start()
	f.apply(map[uint16]string{6000: "one"})
	f.p.Sweep()
	routes, err := f.p.k.routes()
	if err != nil {
		t.Fatal(err)
	}
	cookie, err := NetNSCookie(f.ns)
	if err != nil {
		t.Fatal(err)
	}
	// IPv4 only: the endpoint is IPv4.
	want := map[routeKey]bool{newRouteKey(cookie, 6000, false): true}
	if len(routes) != len(want) {
		t.Errorf("routes after the restart: %v; want only %v", routes, want)
	}
	for rk := range routes {
		if !want[rk] {
			t.Errorf("route %+v left after the restart", rk)
		}
	}
	ids, _ := f.p.k.tableIDs()
	if len(ids) != 1 {
		t.Errorf("tables after the restart: %v; want one", ids)
	}
	cs, _ := f.p.k.counters()
	if len(cs) != 1 || cs[0].Endpoint != b1.addr || cs[0].Connects != 0 {
		t.Errorf("counters after the restart: %+v; want one, fresh, for %s", cs, b1.addr)
	}
	if name, _ := mustDial(t, f.ns, "127.0.0.1:6000"); name != "b1" {
		t.Errorf("after the restart 127.0.0.1:6000 reached %q; want b1", name)
	}
	if _, _, err := dial(f.ns, "127.0.0.1:6001"); err == nil {
		t.Errorf("the route of a port no longer wanted survived the restart")
	}
}

// An IPv6 socket connecting to a v4-mapped loopback address is IPv4
// loopback traffic: it takes the IPv4 route and reads back the mapped
// address it asked for.
func TestV4MappedConnect(t *testing.T) {
	f := newFixture(t)
	b1 := startBackend(t, f.ns, "b1", "198.18.201.1:0")
	f.res.set("one", group(1, []netip.AddrPort{b1.addr}))
	f.apply(map[uint16]string{6000: "one"})

	var fd int
	var peer unix.Sockaddr
	err := netns.Do(f.ns, func() error {
		var err error
		if fd, err = unix.Socket(unix.AF_INET6, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0); err != nil {
			return err
		}
		mapped := netip.MustParseAddr("::ffff:127.0.0.1").As16()
		if err := unix.Connect(fd, &unix.SockaddrInet6{Port: 6000, Addr: mapped}); err != nil {
			unix.Close(fd)
			return err
		}
		peer, err = unix.Getpeername(fd)
		return err
	})
	if err != nil {
		t.Fatalf("connecting to [::ffff:127.0.0.1]:6000: %v", err)
	}
	defer unix.Close(fd)
	sa, ok := peer.(*unix.SockaddrInet6)
	if !ok || netip.AddrFrom16(sa.Addr) != netip.MustParseAddr("::ffff:127.0.0.1") || sa.Port != 6000 {
		t.Errorf("getpeername = %#v; want [::ffff:127.0.0.1]:6000", peer)
	}
	buf := make([]byte, 64)
	n, _ := unix.Read(fd, buf)
	if !strings.HasPrefix(string(buf[:n]), "b1 ") {
		t.Errorf("answer %q; want b1's", buf[:n])
	}
}

// When an answer expires the path asks again, and a changed answer
// replaces the table.
func TestRefreshOnExpiry(t *testing.T) {
	f := newFixture(t)
	f.res.ttl = 100 * time.Millisecond
	b1 := startBackend(t, f.ns, "b1", "198.18.201.1:0")
	b2 := startBackend(t, f.ns, "b2", "198.18.201.2:0")
	f.res.set("moving", group(1, []netip.AddrPort{b1.addr}))
	f.apply(map[uint16]string{6000: "moving"})
	if name, _ := mustDial(t, f.ns, "127.0.0.1:6000"); name != "b1" {
		t.Fatalf("reached %q; want b1", name)
	}
	f.res.set("moving", group(1, []netip.AddrPort{b2.addr}))
	eventually(t, "the new answer serves after the old one expired", func() bool {
		name, _, _ := dial(f.ns, "127.0.0.1:6000")
		return name == "b2"
	})
}

// The target policy bounds the socket path: a refused endpoint is never
// written, and a service with nothing allowed stays on the relay.
func TestTargetPolicy(t *testing.T) {
	f := newFixture(t)
	b1 := startBackend(t, f.ns, "b1", "198.18.201.1:0")
	b2 := startBackend(t, f.ns, "b2", "198.18.201.2:0")
	f.p.cfg.Allowed = func(a netip.Addr) error {
		if a == b2.addr.Addr() {
			return fmt.Errorf("%s: refused", a)
		}
		return nil
	}
	f.res.set("mixed", group(1, []netip.AddrPort{b1.addr, b2.addr}))
	f.res.set("refused", group(1, []netip.AddrPort{b2.addr}))
	f.apply(map[uint16]string{6000: "mixed", 6001: "refused"})
	if s := f.serving(6000, "ipv4"); s.Path != "socket" || len(s.Endpoints) != 1 || s.Endpoints[0] != b1.addr {
		t.Errorf("port 6000: %+v; want the socket path with %s alone", s, b1.addr)
	}
	for range 20 {
		if name, _ := mustDial(t, f.ns, "127.0.0.1:6000"); name != "b1" {
			t.Fatalf("reached %q, which the policy refuses", name)
		}
	}
	if s := f.serving(6001, "ipv4"); s.Path != "relay" || !strings.Contains(s.Why, "target policy") {
		t.Errorf("port 6001: %+v; want the relay, because the target policy refuses everything", s)
	}
}

// A service that does not resolve yet stays on the relay, and moves to the
// socket path once it does, with no new Apply.
func TestLateService(t *testing.T) {
	f := newFixture(t)
	b1 := startBackend(t, f.ns, "b1", "198.18.201.1:0")
	f.apply(map[uint16]string{6000: "late"})
	if s := f.serving(6000, "ipv4"); s.Path != "relay" {
		t.Fatalf("an unresolvable service: %+v; want the relay", s)
	}
	f.res.set("late", group(1, []netip.AddrPort{b1.addr}))
	eventually(t, "the service moves to the socket path once it resolves", func() bool {
		name, _, _ := dial(f.ns, "127.0.0.1:6000")
		return name == "b1"
	})
}

// One namespace gets at most maxPortsPerNamespace ports on the socket path.
func TestPortsPerNamespaceBound(t *testing.T) {
	f := newFixture(t)
	b1 := startBackend(t, f.ns, "b1", "198.18.201.1:0")
	f.res.set("one", group(1, []netip.AddrPort{b1.addr}))
	routes := map[uint16]string{}
	for port := uint16(10000); port < 10000+maxPortsPerNamespace+10; port++ {
		routes[port] = "one"
	}
	f.apply(routes)
	n := map[string]int{}
	for _, s := range f.p.Status() {
		n[s.Path]++
	}
	// IPv4 only: the endpoint is IPv4, so [::1] is the relay's anyway.
	if n["socket"] != maxPortsPerNamespace || n["relay"] != maxPortsPerNamespace+20 {
		t.Errorf("ports by path (both families): %v; want %d on the socket path, the IPv6 ones and the 20 above the bound on the relay", n, maxPortsPerNamespace)
	}
}

// An endpoint that drops SYNs (a vanished host) is taken out when the
// first SYN to it times out, about a second in, while that connect still
// waits; the connects after it go to the live endpoint.
func TestSYNTimeoutTakesEndpointOut(t *testing.T) {
	f := newFixture(t)
	// The endpoint answers the namespace's reach check, then vanishes.
	hole, fill := blackholeIn(t, f.ns, "198.18.201.3")
	b1 := startBackend(t, f.ns, "b1", "198.18.201.1:0")
	f.res.set("h", group(1, []netip.AddrPort{hole, b1.addr}))
	f.apply(map[uint16]string{6000: "h"})
	if eps := f.serving(6000, "ipv4").Endpoints; len(eps) != 2 {
		t.Fatalf("socket path endpoints %v; want both", eps)
	}
	fill()

	// Connect until one is sent into the hole, and leave that one
	// waiting: closed before its SYN timed out it would be no evidence.
	for i := 0; ; i++ {
		if i == 200 {
			t.Fatal("200 connects and none went to the endpoint that drops SYNs")
		}
		if !connectPending(t, f.ns, 6000) {
			break
		}
	}
	eventually(t, "the endpoint that drops SYNs leaves the table", func() bool {
		eps := f.serving(6000, "ipv4").Endpoints
		return len(eps) == 1 && eps[0] == b1.addr
	})
	for range 50 {
		if name, _ := mustDial(t, f.ns, "127.0.0.1:6000"); name != "b1" {
			t.Fatalf("reached %q once the hole was out", name)
		}
	}
	if !strings.Contains(f.logs.String(), "did not answer a SYN in time") {
		t.Errorf("no log line says why the endpoint went:\n%s", f.logs)
	}
}

// connectPending starts a non-blocking connect to 127.0.0.1:port in ns and
// reports whether it completed within 200ms. One that did not is left
// pending, and closed when the test ends.
func connectPending(t *testing.T, ns string, port int) (done bool) {
	t.Helper()
	var fd int
	err := netns.Do(ns, func() error {
		var err error
		if fd, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0); err != nil {
			return err
		}
		err = unix.Connect(fd, &unix.SockaddrInet4{Port: port, Addr: [4]byte{127, 0, 0, 1}})
		if err != nil && err != unix.EINPROGRESS {
			unix.Close(fd)
			return err
		}
		return nil
	})
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
	if n, _ := unix.Poll(pfd, 200); n > 0 {
		unix.Close(fd)
		return true
	}
	t.Cleanup(func() { unix.Close(fd) })
	return false
}

// blackholeIn returns an address in ns, a listener of backlog 0, and fill,
// which fills its accept queue: from then on the kernel drops its SYNs.
func blackholeIn(t *testing.T, ns, ip string) (netip.AddrPort, func()) {
	t.Helper()
	var fd int
	var addr netip.AddrPort
	err := netns.Do(ns, func() error {
		var err error
		if fd, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0); err != nil {
			return err
		}
		if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: netip.MustParseAddr(ip).As4()}); err != nil {
			return err
		}
		if err := unix.Listen(fd, 0); err != nil {
			return err
		}
		sa, err := unix.Getsockname(fd)
		if err != nil {
			return err
		}
		addr = netip.AddrPortFrom(netip.MustParseAddr(ip), uint16(sa.(*unix.SockaddrInet4).Port))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	fill := func() {
		t.Helper()
		err := netns.Do(ns, func() error {
			// The kernel drops SYNs once the queue is full.
			for i := 0; i < 16; i++ {
				c, err := net.DialTimeout("tcp4", addr.String(), 300*time.Millisecond)
				if err != nil {
					return nil
				}
				t.Cleanup(func() { c.Close() })
			}
			return fmt.Errorf("dials to %s never started hanging", addr)
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	return addr, fill
}
