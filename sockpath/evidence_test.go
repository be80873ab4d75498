package sockpath

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/connectable/connectable/internal/testenv"
	"github.com/connectable/connectable/netns"
)

// abortConnect starts a non-blocking connect to 127.0.0.1:port in ns and
// ends it the way named before the SYN can be answered.
func abortConnect(t *testing.T, ns string, port int, how string) {
	t.Helper()
	err := netns.Do(ns, func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		if how == "linger0" {
			if err := unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0}); err != nil {
				return err
			}
		}
		err = unix.Connect(fd, &unix.SockaddrInet4{Port: port, Addr: [4]byte{127, 0, 0, 1}})
		if err != nil && err != unix.EINPROGRESS {
			return err
		}
		if how == "unspec" {
			// connect(AF_UNSPEC) dissolves the association.
			return disconnect(fd)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("connect and %s: %v", how, err)
	}
}

// disconnect is connect(AF_UNSPEC), which x/sys/unix does not offer.
func disconnect(fd int) error {
	sa := unix.RawSockaddr{Family: unix.AF_UNSPEC}
	_, _, errno := unix.Syscall(unix.SYS_CONNECT, uintptr(fd), uintptr(unsafe.Pointer(&sa)), unsafe.Sizeof(sa))
	if errno != 0 {
		return errno
	}
	return nil
}

func stats(t *testing.T, p *Path) KernelStats {
	t.Helper()
	s, err := p.KernelStats()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func counterOf(t *testing.T, p *Path, ep netip.AddrPort) ServiceCounter {
	t.Helper()
	cs, err := p.Counters()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range cs {
		if c.Endpoint == ep {
			return c
		}
	}
	return ServiceCounter{}
}

// Connects the application ends itself while the SYN is unanswered (close,
// SO_LINGER 0, connect(AF_UNSPEC)) are no evidence: the endpoint stays in
// every choice and the daemon is not even told.
func TestLocalAbortsAreNoEvidence(t *testing.T) {
	f := newFixture(t)
	hole, fill := blackholeIn(t, f.ns, "198.18.201.3")
	b1 := startBackend(t, f.ns, "b1", "198.18.201.1:0")
	f.res.set("h", group(1, []netip.AddrPort{hole, b1.addr}))
	f.apply(map[uint16]string{6000: "h"})
	// Reached once by the namespace's check, then silent.
	if eps := f.serving(6000, "ipv4").Endpoints; len(eps) != 2 {
		t.Fatalf("socket path endpoints %v; want both", eps)
	}
	fill()

	for _, how := range []string{"close", "linger0", "unspec"} {
		for range 100 {
			abortConnect(t, f.ns, 6000, how)
		}
	}
	c := counterOf(t, f.p, hole)
	if c.Connects == 0 {
		t.Fatal("no connect went to the endpoint that drops SYNs")
	}
	s := stats(t, f.p)
	t.Logf("%d aborted connects went to the endpoint that drops SYNs; kernel: %+v", c.Connects, s)
	if c.Failures != 0 || s.Evidence != 0 {
		t.Errorf("aborted connects counted as evidence: counter %+v, stats %+v", c, s)
	}
	if s.LocalClose < c.Connects {
		t.Errorf("LocalClose = %d; want at least the %d aborted connects to the hole", s.LocalClose, c.Connects)
	}
	if dead, _ := f.p.k.deadEndpoints(); len(dead) != 0 {
		t.Errorf("dead marks after aborted connects: %v", dead)
	}
	if h := f.p.Health(); len(h) != 0 {
		t.Errorf("the daemon holds evidence after aborted connects: %+v", h)
	}
	if eps := f.serving(6000, "ipv4").Endpoints; len(eps) != 2 {
		t.Errorf("table after aborted connects: %v; want both endpoints", eps)
	}
}

// A reset in answer to the SYN is evidence, and so is a SYN unanswered
// past its first retransmission timeout.
func TestRemoteFailuresAreEvidence(t *testing.T) {
	f := newFixture(t)
	b1 := startBackend(t, f.ns, "b1", "198.18.201.1:0")
	closed := b1.addr
	f.res.set("c", group(1, []netip.AddrPort{closed}))
	f.apply(map[uint16]string{6000: "c"})
	// Reached once by the namespace's check, then gone.
	if eps := f.serving(6000, "ipv4").Endpoints; len(eps) != 1 {
		t.Fatalf("socket path endpoints %v; want %s", eps, closed)
	}
	b1.stop()
	if _, _, err := dial(f.ns, "127.0.0.1:6000"); err == nil {
		t.Fatal("a connect to a closed port succeeded")
	}
	eventually(t, "a refused connect is evidence", func() bool {
		dead, _ := f.p.k.deadEndpoints()
		return stats(t, f.p).Evidence == 1 && len(dead) == 1 && dead[0] == closed
	})

	hole, fill := blackholeIn(t, f.ns, "198.18.201.3")
	f.res.set("h", group(1, []netip.AddrPort{hole}))
	f.apply(map[uint16]string{6000: "c", 6001: "h"})
	if eps := f.serving(6001, "ipv4").Endpoints; len(eps) != 1 {
		t.Fatalf("socket path endpoints of 6001 %v; want %s", eps, hole)
	}
	fill()
	start := time.Now()
	if !connectPending(t, f.ns, 6001) {
		eventually(t, "a SYN unanswered past its timeout is evidence", func() bool {
			return stats(t, f.p).Evidence == 2
		})
		t.Logf("the SYN timeout was reported %v after the connect", time.Since(start).Round(time.Millisecond))
	} else {
		t.Fatal("a connect to the hole completed")
	}
}

// iptables runs iptables inside ns (never in the host's namespace).
func iptables(t *testing.T, ns string, args ...string) {
	t.Helper()
	testenv.NeedCommand(t, "iptables")
	testenv.Exec(t, ns, "iptables", args...)
}

// The attack of issue 19: one namespace's connects, aborted or failing
// only inside it, never take a shared endpoint away from another.
func TestOneNamespaceCannotDecideForAnother(t *testing.T) {
	res := newFakeResolver(time.Hour)
	addrs := []string{"198.18.202.1/32", "198.18.202.2/32"}
	nsA := netnsWithAddrs(t, addrs...)
	nsB := netnsWithAddrs(t, addrs...)
	probe := netnsWithAddrs(t, addrs...) // the daemon's stand-in
	eps := []netip.AddrPort{netip.MustParseAddrPort("198.18.202.1:7001"), netip.MustParseAddrPort("198.18.202.2:7001")}
	for _, ns := range []string{nsA, nsB, probe} {
		for i, ep := range eps {
			startBackend(t, ns, fmt.Sprintf("e%d", i+1), ep.String())
		}
	}
	k := loadKernel(t, bpffs(t))
	logs := &testenv.SyncBuffer{}
	p, err := New(Config{Kernel: k, Resolver: res, RetryMin: 50 * time.Millisecond, RetryMax: 200 * time.Millisecond,
		ProbeNetNS: probe, Logger: testenv.Logger(t, logs)})
	if err != nil {
		k.Remove()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	res.set("s", group(1, eps))
	for key, ns := range map[string]string{"a": nsA, "b": nsB} {
		if err := p.Apply(context.Background(), key, ns, map[uint16]string{6000: "s"}); err != nil {
			t.Fatal(err)
		}
	}
	waitSocket(t, p, "a", 2)
	waitSocket(t, p, "b", 2)
	// A drops its own SYNs to e1: its connects there stay in SYN_SENT.
	iptables(t, nsA, "-A", "OUTPUT", "-p", "tcp", "--syn", "-d", eps[0].Addr().String(), "--dport", "7001", "-j", "DROP")

	// victim dials from B while attack runs in A, and counts B's connects
	// that were not served directly by e1 or e2.
	victim := func(attack func(stop <-chan struct{})) (left, toE1, total int) {
		stop := make(chan struct{})
		done := make(chan struct{})
		go func() {
			defer close(done)
			attack(stop)
		}()
		time.Sleep(100 * time.Millisecond) // the attack is under way
		// At least 200 connects, and for long enough that A's failures
		// outlast a few of the daemon's probes.
		until := time.Now().Add(3 * time.Second)
		for total < 200 || time.Now().Before(until) {
			total++
			name, peer, err := dialTimeout(nsB, "127.0.0.1:6000", 5*time.Second)
			if err != nil || peer != "127.0.0.1:6000" || (name != "e1" && name != "e2") {
				left++
				continue
			}
			if name == "e1" {
				toE1++
			}
		}
		close(stop)
		<-done
		return left, toE1, total
	}

	// 1. A loop of connects A aborts while its SYN to e1 is unanswered.
	aborts := 0
	left, toE1, total := victim(func(stop <-chan struct{}) {
		for {
			select {
			case <-stop:
				return
			default:
			}
			abortConnect(t, nsA, 6000, []string{"close", "linger0", "unspec"}[aborts%3])
			aborts++
		}
	})
	s := stats(t, p)
	t.Logf("A aborted %d connects; %d of B's %d connects left the socket path (%d went to e1); kernel: %+v", aborts, left, total, toE1, s)
	if left != 0 || toE1 == 0 {
		t.Errorf("during A's abort loop %d of B's %d connects left the socket path, %d went to e1; want none left and e1 still used", left, total, toE1)
	}
	if s.Evidence != 0 {
		t.Errorf("A's aborted connects were reported as evidence: %+v", s)
	}

	// 2. A's connects to e1 really fail, inside A only: A loses e1, B keeps
	// it, since the daemon's own probe reaches it.
	var aFailed, aServed int
	left, toE1, total = victim(func(stop <-chan struct{}) {
		for {
			select {
			case <-stop:
				return
			default:
			}
			if name, _, err := dialTimeout(nsA, "127.0.0.1:6000", 1500*time.Millisecond); err != nil {
				aFailed++
			} else if name == "e2" {
				aServed++
			}
		}
	})
	s = stats(t, p)
	t.Logf("A: %d connects failed, %d served by e2; %d of B's %d connects left the socket path (%d went to e1); kernel: %+v", aFailed, aServed, left, total, toE1, s)
	if left != 0 || toE1 == 0 {
		t.Errorf("while e1 failed inside A only, %d of B's %d connects left the socket path, %d went to e1; want none left and e1 still used", left, total, toE1)
	}
	if s.Evidence == 0 || aFailed == 0 {
		t.Errorf("A's failed connects to e1 were not evidence: %d failed, %+v", aFailed, s)
	}
	// The kernel took e1 out of A's choices at the first failure, and the
	// daemon's probe reaching e1 does not put it back for A.
	if aFailed > 2 || aServed == 0 {
		t.Errorf("A: %d connects failed, %d served; want e2 serving A after the first failure", aFailed, aServed)
	}
	if p.health.Dead(eps[0]) {
		t.Errorf("e1 confirmed dead, though the daemon reaches it")
	}
	if !strings.Contains(logs.String(), "probing it") {
		t.Errorf("no log line says the daemon probed A's evidence:\n%s", logs)
	}
}

// A connect that is not rewritten drops what an earlier rewritten connect
// of the same socket left: getpeername tells the truth, sockops does not
// watch it.
func TestUnrewrittenConnectClearsState(t *testing.T) {
	f := newFixture(t)
	b1 := startBackend(t, f.ns, "b1", "198.18.201.1:0")
	b2 := startBackend(t, f.ns, "b2", "198.18.201.2:0")
	f.res.set("one", group(1, []netip.AddrPort{b1.addr}))
	f.apply(map[uint16]string{6000: "one"})

	var peer unix.Sockaddr
	err := netns.Do(f.ns, func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		if err := unix.Connect(fd, &unix.SockaddrInet4{Port: 6000, Addr: [4]byte{127, 0, 0, 1}}); err != nil {
			return fmt.Errorf("first connect: %w", err)
		}
		if err := disconnect(fd); err != nil {
			return fmt.Errorf("dissolving: %w", err)
		}
		if err := unix.Connect(fd, &unix.SockaddrInet4{Port: int(b2.addr.Port()), Addr: b2.addr.Addr().As4()}); err != nil {
			return fmt.Errorf("second connect: %w", err)
		}
		peer, err = unix.Getpeername(fd)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if sa, ok := peer.(*unix.SockaddrInet4); !ok || netip.AddrFrom4(sa.Addr) != b2.addr.Addr() || sa.Port != int(b2.addr.Port()) {
		t.Errorf("getpeername after a second connect to %s = %#v; want that address", b2.addr, peer)
	}
	if s := stats(t, f.p); s.Cleared == 0 {
		t.Errorf("the kernel dropped no socket state: %+v", s)
	}

	// A refused second connect is not evidence against the first's
	// endpoint.
	closed := netip.MustParseAddrPort("198.18.201.4:1")
	err = netns.Do(f.ns, func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		if err := unix.Connect(fd, &unix.SockaddrInet4{Port: 6000, Addr: [4]byte{127, 0, 0, 1}}); err != nil {
			return fmt.Errorf("first connect: %w", err)
		}
		disconnect(fd)
		if err := unix.Connect(fd, &unix.SockaddrInet4{Port: int(closed.Port()), Addr: closed.Addr().As4()}); err != unix.ECONNREFUSED {
			return fmt.Errorf("second connect to a closed port: %v; want ECONNREFUSED", err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	if s := stats(t, f.p); s.Evidence != 0 {
		t.Errorf("a refused connect that was not rewritten counted against b1: %+v", s)
	}
	if c := counterOf(t, f.p, b1.addr); c.Failures != 0 {
		t.Errorf("b1's counter: %+v; want no failure", c)
	}
}

// A connect to ::1 is never sent to an IPv4 endpoint, even if a table
// holds one: an IPV6_V6ONLY socket could not reach it (ENETUNREACH). It
// goes to what listens on [::1] instead (the relay).
func TestV6OnlyNeverToIPv4(t *testing.T) {
	ns := netnsWithAddrs(t, "198.18.201.1/24")
	k := loadKernel(t, bpffs(t))
	t.Cleanup(func() {
		if err := k.Remove(); err != nil {
			t.Errorf("Remove: %v", err)
		}
	})
	b1 := startBackend(t, ns, "b1", "198.18.201.1:0")
	startBackend(t, ns, "relay", "[::1]:6000")
	cookie, err := NetNSCookie(ns)
	if err != nil {
		t.Fatal(err)
	}
	eps, slots, _, err := apportion([]candidate{{addr: b1.addr, weight: 1}}, func(netip.AddrPort) bool { return false })
	if err != nil {
		t.Fatal(err)
	}
	if err := k.putTable(1, kernelTable(1, eps, slots)); err != nil {
		t.Fatal(err)
	}
	if err := k.setRoute(newRouteKey(cookie, 6000, true), 1); err != nil {
		t.Fatal(err)
	}
	for _, v6only := range []int{1, 0} {
		var answer string
		err := netns.Do(ns, func() error {
			fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return err
			}
			defer unix.Close(fd)
			if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, v6only); err != nil {
				return err
			}
			if err := unix.Connect(fd, &unix.SockaddrInet6{Port: 6000, Addr: netip.IPv6Loopback().As16()}); err != nil {
				return fmt.Errorf("connect: %w", err)
			}
			buf := make([]byte, 64)
			n, _ := unix.Read(fd, buf)
			answer = string(buf[:n])
			return nil
		})
		if err != nil {
			t.Fatalf("V6ONLY=%d: %v", v6only, err)
		}
		if !strings.HasPrefix(answer, "relay ") {
			t.Errorf("V6ONLY=%d: answered %q; want what listens on [::1]:6000", v6only, answer)
		}
	}
	v, err := k.stats()
	if err != nil {
		t.Fatal(err)
	}
	if got := kernelStats(v).V6OnlyRefused; got != 2 {
		t.Errorf("V6OnlyRefused = %d; want 2", got)
	}
}

// One namespace's evidence is reported within its own budget, so that it
// cannot fill the ring buffer: what is over it is dropped and counted,
// and another namespace's next report still goes through. A table of one
// endpoint keeps it for the namespace that saw it fail (its marks may not
// take out more than half), until the daemon confirms.
func TestEventBudgetPerNamespace(t *testing.T) {
	res := newFakeResolver(time.Hour)
	nsA := netnsWithAddrs(t, "198.18.203.1/32")
	nsB := netnsWithAddrs(t, "198.18.203.1/32")
	probe := netnsWithAddrs(t, "198.18.203.1/32")
	e := netip.MustParseAddrPort("198.18.203.1:7002")
	startBackend(t, probe, "e", e.String())
	// A and B reach it while the socket path decides, then only the
	// daemon does.
	inA := startBackend(t, nsA, "e", e.String())
	inB := startBackend(t, nsB, "e", e.String())
	k := loadKernel(t, bpffs(t))
	p, err := New(Config{Kernel: k, Resolver: res, RetryMin: 50 * time.Millisecond, RetryMax: 200 * time.Millisecond,
		ProbeNetNS: probe, Logger: testenv.Logger(t, &testenv.SyncBuffer{})})
	if err != nil {
		k.Remove()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	res.set("s", group(1, []netip.AddrPort{e}))
	for key, ns := range map[string]string{"a": nsA, "b": nsB} {
		if err := p.Apply(context.Background(), key, ns, map[uint16]string{6000: "s"}); err != nil {
			t.Fatal(err)
		}
	}
	waitSocket(t, p, "a", 1)
	waitSocket(t, p, "b", 1)
	inA.stop()
	inB.stop()
	const n = 300
	start := time.Now()
	refused := 0
	for range n {
		if _, _, err := dial(nsA, "127.0.0.1:6000"); err != nil && strings.Contains(err.Error(), "refused") {
			refused++
		}
	}
	elapsed := time.Since(start)
	s := stats(t, p)
	budget := uint64(kernSockpathConstEVENT_BURST) + uint64(elapsed.Seconds()*float64(kernSockpathConstEVENT_RATE)) + 1
	t.Logf("%d refused connects in %v: %+v (budget about %d)", refused, elapsed.Round(time.Millisecond), s, budget)
	if refused != n {
		t.Fatalf("%d of %d connects refused; want all: the endpoint stays in A's choices", refused, n)
	}
	if s.Evidence > budget || s.Evidence+s.OverBudget != n {
		t.Errorf("evidence %d, over budget %d; want at most %d reported and the rest of %d counted", s.Evidence, s.OverBudget, budget, n)
	}
	if s.PassiveCap == 0 {
		t.Errorf("A's marks were never ignored, though they would take out the whole table")
	}
	before := s.Evidence
	if _, _, err := dial(nsB, "127.0.0.1:6000"); err == nil {
		t.Fatal("B's connect succeeded; nothing listens there")
	}
	if s := stats(t, p); s.Evidence != before+1 {
		t.Errorf("B's evidence after A spent its budget: %d reported; want %d", s.Evidence, before+1)
	}
	if p.health.Dead(e) {
		t.Errorf("e confirmed dead though the daemon reaches it")
	}
}

// Marks older than the kernel heeds are deleted, so that namespaces that
// are gone leave nothing behind; fresh ones stay.
func TestPruneDeadMarks(t *testing.T) {
	k := loadKernel(t, bpffs(t))
	t.Cleanup(func() {
		if err := k.Remove(); err != nil {
			t.Errorf("Remove: %v", err)
		}
	})
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		t.Fatal(err)
	}
	now := uint64(ts.Nano())
	hold := uint64(kernSockpathConstDEAD_HOLD_SECONDS) * uint64(time.Second)
	old := kernDeadKey{Cookie: 1, Ep: endpoint(netip.MustParseAddrPort("198.18.0.1:80"))}
	fresh := kernDeadKey{Cookie: 2, Ep: endpoint(netip.MustParseAddrPort("198.18.0.1:80"))}
	if err := k.objs.Dead.Put(old, now-hold-uint64(time.Second)); err != nil {
		t.Fatal(err)
	}
	if err := k.objs.Dead.Put(fresh, now); err != nil {
		t.Fatal(err)
	}
	n, err := k.pruneDead()
	if err != nil || n != 1 {
		t.Fatalf("pruneDead = %d, %v; want the one stale mark", n, err)
	}
	var at uint64
	if err := k.objs.Dead.Lookup(fresh, &at); err != nil {
		t.Errorf("the fresh mark went too: %v", err)
	}
	if err := k.objs.Dead.Lookup(old, &at); err == nil {
		t.Errorf("the stale mark stayed")
	}
}

// waitSocket waits until the IPv4 port 6000 of the namespace key is on the
// socket path with n endpoints: Apply only records the routes, and the
// namespace's reach checks decide after it.
func waitSocket(t *testing.T, p *Path, key string, n int) {
	t.Helper()
	eventually(t, key+"'s port 6000 on the socket path", func() bool {
		for _, s := range p.Status() {
			if s.Key == key && s.Port == 6000 && s.Family == "ipv4" {
				return s.Path == "socket" && len(s.Endpoints) == n
			}
		}
		return false
	})
}
