package iptables_test

import (
	"bufio"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
	"github.com/connectable/connectable/iptables"
	"github.com/connectable/connectable/netns"
	"github.com/connectable/connectable/origdst"
)

var backends = []string{iptables.BackendNFT, iptables.BackendLegacy}

// forEachBackend runs fn as a subtest per backend, after the checks every
// root test needs.
func forEachBackend(t *testing.T, fn func(t *testing.T, backend string)) {
	t.Helper()
	testenv.NeedRoot(t)
	testenv.GuardRootRules(t)
	for _, b := range backends {
		t.Run(b, func(t *testing.T) {
			testenv.NeedCommand(t, "iptables-"+b, "ip6tables-"+b, "iptables-"+b+"-restore",
				"ip6tables-"+b+"-restore", "iptables-"+b+"-save", "ip6tables-"+b+"-save")
			fn(t, b)
		})
	}
}

func newNAT(t testing.TB, backend string) *iptables.NAT {
	t.Helper()
	n, err := iptables.New(iptables.Config{Backend: backend, Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("iptables.New(%s): %v", backend, err)
	}
	if n.Backend() != backend {
		t.Fatalf("Backend() = %s; want %s", n.Backend(), backend)
	}
	return n
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(logWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type logWriter struct{ t testing.TB }

func (w logWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

// Addresses the tests give the namespace's own veth interface, as a
// container's eth0 would have.
const (
	nsAddr4 = "198.18.0.1"
	nsAddr6 = "fd00:cafe::1"
)

// newNetNS returns a fresh namespace with a veth pair inside it carrying
// nsAddr4 and nsAddr6, so the namespace has non-loopback local addresses.
func newNetNS(t *testing.T) string {
	t.Helper()
	ns := testenv.NewNetNS(t)
	testenv.Exec(t, ns, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
	testenv.Exec(t, ns, "ip", "addr", "add", nsAddr4+"/24", "dev", "eth0")
	testenv.Exec(t, ns, "ip", "-6", "addr", "add", nsAddr6+"/64", "dev", "eth0", "nodad")
	testenv.Exec(t, ns, "ip", "link", "set", "peer0", "up")
	testenv.Exec(t, ns, "ip", "link", "set", "eth0", "up")
	return ns
}

// proxyStub stands for the proxy: it listens in the namespace and answers
// every connection with one line naming the original destination, or
// "not-redirected".
type proxyStub struct {
	port uint16
	v6   bool
	wg   sync.WaitGroup
}

func startProxyStub(t *testing.T, ns string, port uint16) *proxyStub {
	t.Helper()
	v4, v6, err := netns.Listen(ns, port)
	if err != nil {
		t.Fatalf("netns.Listen: %v", err)
	}
	s := &proxyStub{port: uint16(v4.Addr().(*net.TCPAddr).Port), v6: v6 != nil}
	t.Cleanup(s.wg.Wait) // cleanups run last-in first-out: after the closes
	for _, ln := range []*net.TCPListener{v4, v6} {
		if ln == nil {
			continue
		}
		s.wg.Add(1)
		go s.serve(ln)
		t.Cleanup(func() { ln.Close() })
	}
	return s
}

func (s *proxyStub) serve(ln *net.TCPListener) {
	defer s.wg.Done()
	for {
		c, err := ln.AcceptTCP()
		if err != nil {
			return
		}
		dst, err := origdst.Get(c)
		switch {
		case errors.Is(err, origdst.ErrNotRedirected):
			fmt.Fprintln(c, "not-redirected")
		case err != nil:
			fmt.Fprintln(c, "error", err)
		default:
			fmt.Fprintln(c, "redirected", dst)
		}
		c.Close()
	}
}

// ask connects from inside ns to addr and returns the first line the server
// sends. The socket is made inside the namespace; reading happens outside.
func ask(t *testing.T, ns, addr string) string {
	t.Helper()
	var c net.Conn
	err := netns.Do(ns, func() (err error) {
		c, err = net.DialTimeout("tcp", addr, 10*time.Second)
		return err
	})
	if err != nil {
		t.Fatalf("dialling %s in %s: %v", addr, ns, err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		t.Fatalf("reading from %s: %v", addr, err)
	}
	return strings.TrimSpace(line)
}

// serveDirect runs a plain server inside ns on addr that answers "direct".
func serveDirect(t *testing.T, ns, addr string) {
	t.Helper()
	var ln net.Listener
	if err := netns.Do(ns, func() (err error) {
		ln, err = net.Listen("tcp", addr)
		return err
	}); err != nil {
		t.Fatalf("listening on %s in %s: %v", addr, ns, err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			fmt.Fprintln(c, "direct")
			c.Close()
		}
	}()
	t.Cleanup(func() { ln.Close(); wg.Wait() })
}

func TestRedirectReachesListener(t *testing.T) {
	forEachBackend(t, func(t *testing.T, backend string) {
		ns := newNetNS(t)
		nat := newNAT(t, backend)
		stub := startProxyStub(t, ns, 0)
		if !stub.v6 {
			t.Fatalf("no IPv6 listener in a namespace with ::1")
		}
		serveDirect(t, ns, "127.0.0.1:7000")
		serveDirect(t, ns, "[::1]:7000")

		if err := nat.Apply(ns, []uint16{6000, 6001}, stub.port); err != nil {
			t.Fatalf("Apply: %v", err)
		}
		for _, addr := range []string{
			"127.0.0.1:6000", "127.0.0.1:6001", "[::1]:6000", "[::1]:6001",
			nsAddr4 + ":6000", "[" + nsAddr6 + "]:6001",
		} {
			want := "redirected " + netip.MustParseAddrPort(addr).String()
			if got := ask(t, ns, addr); got != want {
				t.Errorf("%s: got %q; want %q", addr, got, want)
			}
		}
		for _, addr := range []string{
			net.JoinHostPort("127.0.0.1", strconv.Itoa(int(stub.port))),
			net.JoinHostPort("::1", strconv.Itoa(int(stub.port))),
		} {
			if got := ask(t, ns, addr); got != "not-redirected" {
				t.Errorf("direct %s: got %q; want not-redirected", addr, got)
			}
		}
		for _, addr := range []string{"127.0.0.1:7000", "[::1]:7000"} {
			if got := ask(t, ns, addr); got != "direct" {
				t.Errorf("unlabelled %s: got %q; want direct", addr, got)
			}
		}
		if p, err := nat.Port(ns); err != nil || p != stub.port {
			t.Errorf("Port = %d, %v; want %d, nil", p, err, stub.port)
		}
	})
}

// save returns iptables-save and ip6tables-save of ns without comments and
// counters.
func save(t *testing.T, ns, backend string) string {
	t.Helper()
	var b strings.Builder
	for _, prog := range []string{"iptables-" + backend + "-save", "ip6tables-" + backend + "-save"} {
		fmt.Fprintf(&b, "== %s\n", prog)
		for line := range strings.Lines(testenv.Exec(t, ns, prog)) {
			if strings.HasPrefix(line, "#") {
				continue
			}
			b.WriteString(counters.ReplaceAllString(line, "[]"))
		}
	}
	return b.String()
}

var counters = regexp.MustCompile(`\[\d+:\d+\]`)

// ours returns the lines of a save that mention our chain or comment: per
// program its "==" header, then, per table that has any, "*table" and
// those lines. Tables come in a fixed order (filter, nat), since the save
// programs print them in an order that depends on the backend and on which
// table a namespace used first.
func ours(save string) []string {
	var out []string
	byTable := map[string][]string{}
	flush := func() {
		for _, tbl := range []string{"filter", "nat"} {
			if len(byTable[tbl]) > 0 {
				out = append(out, "*"+tbl)
				out = append(out, byTable[tbl]...)
			}
		}
		clear(byTable)
	}
	tbl := ""
	for line := range strings.Lines(save) {
		line = strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(line, "=="):
			flush()
			out = append(out, line)
		case strings.HasPrefix(line, "*"):
			tbl = line[1:]
		case strings.Contains(line, iptables.Chain) || strings.Contains(line, "connectable"):
			byTable[tbl] = append(byTable[tbl], line)
		}
	}
	flush()
	return out
}

// wantOurs is what ours returns when the rules redirect ports to toPort.
func wantOurs(backend string, toPort uint16, ports ...uint16) []string {
	var out []string
	for _, fam := range []string{"iptables", "ip6tables"} {
		out = append(out, "== "+fam+"-"+backend+"-save", "*filter", ":CONNECTABLE - []", "-A INPUT -j CONNECTABLE")
		for _, verdict := range []string{"-m socket --transparent --nowildcard -m comment --comment connectable -j RETURN", "-m comment --comment connectable -j DROP"} {
			out = append(out, fmt.Sprintf("-A CONNECTABLE -i lo -p tcp -m tcp --dport %d --tcp-flags FIN,SYN,RST,ACK SYN %s", toPort, verdict))
		}
		out = append(out, "*nat", ":CONNECTABLE - []", "-A OUTPUT -j CONNECTABLE")
		for _, p := range ports {
			out = append(out, fmt.Sprintf("-A CONNECTABLE -p tcp -m addrtype --dst-type LOCAL -m tcp --dport %d -m comment --comment connectable -j REDIRECT --to-ports %d", p, toPort))
		}
	}
	return out
}

func TestApplyIsIdempotentAndExact(t *testing.T) {
	forEachBackend(t, func(t *testing.T, backend string) {
		ns := newNetNS(t)
		nat := newNAT(t, backend)
		if err := nat.Apply(ns, []uint16{6001, 6000}, 40000); err != nil {
			t.Fatalf("Apply: %v", err)
		}
		first := save(t, ns, backend)
		if got, want := ours(first), wantOurs(backend, 40000, 6000, 6001); !slices.Equal(got, want) {
			t.Errorf("after Apply got\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
		if err := nat.Apply(ns, []uint16{6000, 6001}, 40000); err != nil {
			t.Fatalf("second Apply: %v", err)
		}
		if second := save(t, ns, backend); second != first {
			t.Errorf("second Apply changed the rules:\nbefore\n%s\nafter\n%s", first, second)
		}

		// Changed ports and target: nothing stale stays behind.
		if err := nat.Apply(ns, []uint16{6001, 6002, 6003}, 40001); err != nil {
			t.Fatalf("Apply with changed ports: %v", err)
		}
		if got, want := ours(save(t, ns, backend)), wantOurs(backend, 40001, 6001, 6002, 6003); !slices.Equal(got, want) {
			t.Errorf("after change got\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
		if err := nat.Apply(ns, []uint16{6001, 6002, 6003, 6004}, 40001); err != nil {
			t.Fatalf("Apply with an added port: %v", err)
		}
		if got, want := ours(save(t, ns, backend)), wantOurs(backend, 40001, 6001, 6002, 6003, 6004); !slices.Equal(got, want) {
			t.Errorf("after adding got\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
	})
}

func TestClearLeavesNoTrace(t *testing.T) {
	forEachBackend(t, func(t *testing.T, backend string) {
		ns := newNetNS(t)
		nat := newNAT(t, backend)
		if err := nat.Clear(ns); err != nil {
			t.Fatalf("Clear of a fresh namespace: %v", err)
		}
		if err := nat.Apply(ns, []uint16{6000}, 40000); err != nil {
			t.Fatalf("Apply: %v", err)
		}
		if p, err := nat.Port(ns); err != nil || p != 40000 {
			t.Errorf("Port after Apply = %d, %v; want 40000, nil", p, err)
		}
		if err := nat.Clear(ns); err != nil {
			t.Fatalf("Clear: %v", err)
		}
		after := save(t, ns, backend)
		if got := ours(after); len(got) != 2 { // just the two "==" headers
			t.Errorf("Clear left\n%s", after)
		}
		if strings.Contains(after, "-A ") {
			t.Errorf("Clear left rules:\n%s", after)
		}
		if p, err := nat.Port(ns); err != nil || p != 0 {
			t.Errorf("Port after Clear = %d, %v; want 0, nil", p, err)
		}
		if err := nat.Clear(ns); err != nil {
			t.Fatalf("second Clear: %v", err)
		}
		// A filter chain nobody jumps to (a run that died half-way) is ours
		// too.
		for _, prog := range []string{"iptables-" + backend, "ip6tables-" + backend} {
			testenv.Exec(t, ns, prog, "-t", "filter", "-N", iptables.Chain)
			testenv.Exec(t, ns, prog, "-t", "filter", "-A", iptables.Chain, "-p", "tcp", "-j", "DROP")
		}
		if err := nat.Clear(ns); err != nil {
			t.Fatalf("Clear of a lone filter chain: %v", err)
		}
		if after := save(t, ns, backend); len(ours(after)) != 2 || strings.Contains(after, "-A ") {
			t.Errorf("Clear of a lone filter chain left\n%s", after)
		}
		gone := "/var/run/netns/" + testenv.RandomName("cnt-gone-")
		if err := nat.Clear(gone); err != nil {
			t.Errorf("Clear of a namespace that is gone: %v", err)
		}
		if err := nat.Apply(gone, []uint16{6000}, 40000); err == nil {
			t.Errorf("Apply to a namespace that is gone: no error")
		}
	})
}

func TestApplyRepairsCrashLeftovers(t *testing.T) {
	forEachBackend(t, func(t *testing.T, backend string) {
		nat := newNAT(t, backend)
		// Each command is run as is, with "PORT" replaced, by iptables and
		// by ip6tables.
		guard := func(port string) [][]string {
			syn := []string{"-i", "lo", "-p", "tcp", "--dport", port, "--tcp-flags", "SYN,ACK,RST,FIN", "SYN"}
			tag := []string{"-m", "comment", "--comment", "connectable"}
			return [][]string{
				slices.Concat([]string{"-t", "filter", "-A", "CONNECTABLE"}, syn, []string{"-m", "socket", "--transparent", "--nowildcard"}, tag, []string{"-j", "RETURN"}),
				slices.Concat([]string{"-t", "filter", "-A", "CONNECTABLE"}, syn, tag, []string{"-j", "DROP"}),
			}
		}
		leftovers := map[string][][]string{
			"duplicated jumps, stale rules, old port": slices.Concat([][]string{
				{"-t", "nat", "-N", "CONNECTABLE"},
				{"-t", "nat", "-A", "CONNECTABLE", "-p", "tcp", "-m", "addrtype", "--dst-type", "LOCAL", "--dport", "6000", "-m", "comment", "--comment", "connectable", "-j", "REDIRECT", "--to-ports", "39999"},
				{"-t", "nat", "-A", "CONNECTABLE", "-p", "tcp", "-m", "addrtype", "--dst-type", "LOCAL", "--dport", "7777", "-m", "comment", "--comment", "connectable", "-j", "REDIRECT", "--to-ports", "39999"},
				{"-t", "nat", "-A", "CONNECTABLE", "-p", "tcp", "--dport", "6000", "-j", "REDIRECT", "--to-ports", "39999"},
				{"-t", "nat", "-A", "OUTPUT", "-j", "CONNECTABLE"},
				{"-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "CONNECTABLE"},
				{"-t", "nat", "-A", "OUTPUT", "-j", "CONNECTABLE"},
				{"-t", "filter", "-N", "CONNECTABLE"},
			}, guard("39999"), [][]string{
				{"-t", "filter", "-A", "CONNECTABLE", "-p", "udp", "-j", "ACCEPT"},
				{"-t", "filter", "-A", "INPUT", "-j", "CONNECTABLE"},
				{"-t", "filter", "-A", "INPUT", "-i", "lo", "-j", "CONNECTABLE"},
				{"-t", "filter", "-A", "INPUT", "-j", "CONNECTABLE"},
			}),
			"chains without jumps": {
				{"-t", "nat", "-N", "CONNECTABLE"},
				{"-t", "nat", "-A", "CONNECTABLE", "-p", "tcp", "--dport", "7777", "-j", "REDIRECT", "--to-ports", "39999"},
				{"-t", "filter", "-N", "CONNECTABLE"},
				{"-t", "filter", "-A", "CONNECTABLE", "-p", "tcp", "--dport", "7777", "-j", "DROP"},
			},
			"right rules, duplicated jumps": slices.Concat([][]string{
				{"-t", "nat", "-N", "CONNECTABLE"},
				{"-t", "nat", "-A", "CONNECTABLE", "-p", "tcp", "-m", "addrtype", "--dst-type", "LOCAL", "--dport", "6000", "-m", "comment", "--comment", "connectable", "-j", "REDIRECT", "--to-ports", "PORT"},
				{"-t", "nat", "-A", "OUTPUT", "-j", "CONNECTABLE"},
				{"-t", "nat", "-I", "OUTPUT", "1", "-j", "CONNECTABLE"},
				{"-t", "filter", "-N", "CONNECTABLE"},
			}, guard("PORT"), [][]string{
				{"-t", "filter", "-A", "INPUT", "-j", "CONNECTABLE"},
				{"-t", "filter", "-I", "INPUT", "1", "-j", "CONNECTABLE"},
			}),
			"nat only, as an earlier version left it": {
				{"-t", "nat", "-N", "CONNECTABLE"},
				{"-t", "nat", "-A", "CONNECTABLE", "-p", "tcp", "-m", "addrtype", "--dst-type", "LOCAL", "--dport", "6000", "-m", "comment", "--comment", "connectable", "-j", "REDIRECT", "--to-ports", "PORT"},
				{"-t", "nat", "-A", "OUTPUT", "-j", "CONNECTABLE"},
			},
			"guard only, half written": slices.Concat([][]string{
				{"-t", "filter", "-N", "CONNECTABLE"},
			}, guard("PORT")[:1], [][]string{
				{"-t", "filter", "-A", "INPUT", "-j", "CONNECTABLE"},
			}),
		}
		for name, cmds := range leftovers {
			t.Run(name, func(t *testing.T) {
				ns := newNetNS(t)
				stub := startProxyStub(t, ns, 0)
				for _, prog := range []string{"iptables-" + backend, "ip6tables-" + backend} {
					for _, args := range cmds {
						args = slices.Clone(args)
						for i := range args {
							args[i] = strings.ReplaceAll(args[i], "PORT", strconv.Itoa(int(stub.port)))
						}
						testenv.Exec(t, ns, prog, args...)
					}
				}
				if err := nat.Apply(ns, []uint16{6000}, stub.port); err != nil {
					t.Fatalf("Apply: %v", err)
				}
				if got, want := ours(save(t, ns, backend)), wantOurs(backend, stub.port, 6000); !slices.Equal(got, want) {
					t.Errorf("after repair got\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
				}
				for _, addr := range []string{"127.0.0.1:6000", "[::1]:6000"} {
					if got, want := ask(t, ns, addr), "redirected "+addr; got != want {
						t.Errorf("%s: got %q; want %q", addr, got, want)
					}
				}
				if err := nat.Clear(ns); err != nil {
					t.Fatalf("Clear: %v", err)
				}
				if got := ours(save(t, ns, backend)); len(got) != 2 {
					t.Errorf("Clear left %q", got)
				}
			})
		}
	})
}

// TestGuardHoldsConnectsWhileNothingListens is the restart window: the
// rules stay while no daemon listens on their port. A connect to a labelled
// port then waits (its SYN is dropped) instead of being refused, and lands
// once a listener appears, at the client's SYN retransmit.
func TestGuardHoldsConnectsWhileNothingListens(t *testing.T) {
	forEachBackend(t, func(t *testing.T, backend string) {
		ns := newNetNS(t)
		nat := newNAT(t, backend)
		v4, v6, err := netns.Listen(ns, 0)
		if err != nil {
			t.Fatal(err)
		}
		port := uint16(v4.Addr().(*net.TCPAddr).Port)
		v4.Close()
		addrs := []string{"127.0.0.1:6000"}
		if v6 != nil {
			v6.Close()
			addrs = append(addrs, "[::1]:6000")
		}
		if err := nat.Apply(ns, []uint16{6000}, port); err != nil {
			t.Fatalf("Apply: %v", err)
		}

		// Nothing on port: each connect is still pending when it gives up.
		for addr, err := range dialAll(t, ns, addrs, 300*time.Millisecond) {
			var ne net.Error
			if !errors.As(err, &ne) || !ne.Timeout() {
				t.Errorf("%s with nothing listening: %v; want a timeout (the SYN dropped, not refused)", addr, err)
			}
		}

		// A listener on port: connects pass the guard.
		closeLn := listenAt(t, ns, port)
		for addr, err := range dialAll(t, ns, addrs, 5*time.Second) {
			if err != nil {
				t.Errorf("%s with a listener: %v", addr, err)
			}
		}
		closeLn()

		// A gated listener (a daemon about to close it): new connects wait
		// as if nothing listened, and what it had queued stays for accept.
		v4g, v6g, err := netns.Listen(ns, port)
		if err != nil {
			t.Fatal(err)
		}
		gated := []*net.TCPListener{v4g}
		if v6g != nil {
			gated = append(gated, v6g)
		}
		var queued []net.Conn
		for _, addr := range addrs {
			if err := netns.Do(ns, func() error {
				c, err := net.DialTimeout("tcp", addr, 5*time.Second)
				if err == nil {
					queued = append(queued, c)
				}
				return err
			}); err != nil {
				t.Fatalf("%s before the gate: %v", addr, err)
			}
		}
		for _, ln := range gated {
			if err := netns.Gate(ln); err != nil {
				t.Fatalf("Gate: %v", err)
			}
		}
		for addr, err := range dialAll(t, ns, addrs, 300*time.Millisecond) {
			var ne net.Error
			if !errors.As(err, &ne) || !ne.Timeout() {
				t.Errorf("%s through a gated listener: %v; want a timeout (the SYN dropped)", addr, err)
			}
		}
		for _, ln := range gated {
			if err := netns.Drained(ln, 50*time.Millisecond); err == nil {
				t.Errorf("Drained with a connection queued and nobody accepting: nil; want an error")
			}
			c, err := ln.Accept()
			if err != nil {
				t.Fatalf("accepting what the gated listener had queued: %v", err)
			}
			c.Close()
			if err := netns.Drained(ln, time.Second); err != nil {
				t.Errorf("Drained once the queue was taken: %v", err)
			}
			ln.Close()
		}
		for _, c := range queued {
			c.Close()
		}

		// The restart: connects that start while nothing listens land on
		// the listener that appears later.
		done := make(chan map[string]error)
		go func() { done <- dialAll(t, ns, addrs, 5*time.Second) }()
		time.Sleep(300 * time.Millisecond)
		start := time.Now()
		closeLn = listenAt(t, ns, port)
		for addr, err := range <-done {
			if err != nil {
				t.Errorf("%s with a listener opened 300ms later: %v", addr, err)
			}
		}
		t.Logf("pending connects landed %v after the listener opened", time.Since(start).Round(time.Millisecond))
		closeLn()

		// It is the guard that holds them: without it, refused at once.
		for _, prog := range []string{"iptables-" + backend, "ip6tables-" + backend} {
			testenv.Exec(t, ns, prog, "-t", "filter", "-F", iptables.Chain)
		}
		for addr, err := range dialAll(t, ns, addrs, 300*time.Millisecond) {
			if !errors.Is(err, syscall.ECONNREFUSED) {
				t.Errorf("%s without the guard: %v; want ECONNREFUSED", addr, err)
			}
		}
		if err := nat.Apply(ns, []uint16{6000}, port); err != nil {
			t.Fatalf("Apply: %v", err)
		}
		if got, want := ours(save(t, ns, backend)), wantOurs(backend, port, 6000); !slices.Equal(got, want) {
			t.Errorf("Apply did not restore the guard: got\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
		}

		// Cleared: nothing of ours is left, and a connect to 6000 with
		// nothing on 6000 is refused at once, as without connectable.
		if err := nat.Clear(ns); err != nil {
			t.Fatalf("Clear: %v", err)
		}
		if after := save(t, ns, backend); len(ours(after)) != 2 {
			t.Errorf("Clear left\n%s", after)
		}
		for addr, err := range dialAll(t, ns, addrs, 300*time.Millisecond) {
			if !errors.Is(err, syscall.ECONNREFUSED) {
				t.Errorf("%s after Clear: %v; want ECONNREFUSED", addr, err)
			}
		}
	})
}

// dialAll connects from inside ns to every addr at once, each within
// timeout, closes what connected, and returns each dial's error.
func dialAll(t *testing.T, ns string, addrs []string, timeout time.Duration) map[string]error {
	var mu sync.Mutex
	errs := make(map[string]error)
	var wg sync.WaitGroup
	for _, addr := range addrs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var c net.Conn
			err := netns.Do(ns, func() (err error) {
				c, err = net.DialTimeout("tcp", addr, timeout)
				return err
			})
			if c != nil {
				c.Close()
			}
			mu.Lock()
			errs[addr] = err
			mu.Unlock()
		}()
	}
	wg.Wait()
	return errs
}

// listenAt listens on port at 127.0.0.1 and, where ns has it, ::1 inside
// ns, accepting nothing: the kernel completes connects without accept. The
// returned function closes both; the test's end does too.
func listenAt(t *testing.T, ns string, port uint16) func() {
	t.Helper()
	v4, v6, err := netns.Listen(ns, port)
	if err != nil {
		t.Fatalf("netns.Listen(%d): %v", port, err)
	}
	closeAll := func() {
		v4.Close()
		if v6 != nil {
			v6.Close()
		}
	}
	t.Cleanup(closeAll)
	return closeAll
}

func TestIPv6DisabledNamespace(t *testing.T) {
	forEachBackend(t, func(t *testing.T, backend string) {
		ns := testenv.NewNetNS(t)
		testenv.Exec(t, ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1")
		nat := newNAT(t, backend)
		stub := startProxyStub(t, ns, 0)
		if stub.v6 {
			t.Fatalf("IPv6 listener in a namespace with IPv6 disabled")
		}
		if err := nat.Apply(ns, []uint16{6000}, stub.port); err != nil {
			t.Fatalf("Apply: %v", err)
		}
		if got, want := ask(t, ns, "127.0.0.1:6000"), "redirected 127.0.0.1:6000"; got != want {
			t.Errorf("got %q; want %q", got, want)
		}
		if p, err := nat.Port(ns); err != nil || p != stub.port {
			t.Errorf("Port = %d, %v; want %d, nil", p, err, stub.port)
		}
		if err := nat.Clear(ns); err != nil {
			t.Fatalf("Clear: %v", err)
		}
	})
}

func TestRestartKeepsPort(t *testing.T) {
	// A restarted daemon asks Port, listens there again, and Apply then has
	// nothing to change.
	forEachBackend(t, func(t *testing.T, backend string) {
		ns := newNetNS(t)
		nat := newNAT(t, backend)
		v4, v6, err := netns.Listen(ns, 0)
		if err != nil {
			t.Fatal(err)
		}
		port := uint16(v4.Addr().(*net.TCPAddr).Port)
		if err := nat.Apply(ns, []uint16{6000}, port); err != nil {
			t.Fatal(err)
		}
		before := save(t, ns, backend)
		v4.Close()
		v6.Close()

		nat2 := newNAT(t, backend)
		p, err := nat2.Port(ns)
		if err != nil || p != port {
			t.Fatalf("Port = %d, %v; want %d", p, err, port)
		}
		stub := startProxyStub(t, ns, p)
		if err := nat2.Apply(ns, []uint16{6000}, stub.port); err != nil {
			t.Fatal(err)
		}
		if after := save(t, ns, backend); after != before {
			t.Errorf("rules changed across restart:\nbefore\n%s\nafter\n%s", before, after)
		}
		if got, want := ask(t, ns, "[::1]:6000"), "redirected [::1]:6000"; got != want {
			t.Errorf("got %q; want %q", got, want)
		}
	})
}

func TestAutoBackend(t *testing.T) {
	testenv.NeedRoot(t)
	testenv.GuardRootRules(t)
	testenv.NeedCommand(t, "iptables-nft-save", "iptables-legacy-save")
	n, err := iptables.New(iptables.Config{Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	// The host's Docker keeps its rules in nf_tables; with neither holding
	// rules nft wins too, so only a legacy-only host picks legacy.
	legacy := testenv.Run(t, "iptables-legacy-save") + testenv.Run(t, "ip6tables-legacy-save")
	nft := testenv.Run(t, "iptables-nft-save") + testenv.Run(t, "ip6tables-nft-save")
	want := iptables.BackendNFT
	if strings.Contains(legacy, "\n-A ") && !strings.Contains(nft, "\n-A ") {
		want = iptables.BackendLegacy
	}
	if n.Backend() != want {
		t.Errorf("auto chose %s; want %s", n.Backend(), want)
	}
	if _, err := iptables.New(iptables.Config{Backend: "bogus"}); err == nil {
		t.Errorf("New with a bogus backend: no error")
	}
}

func TestConcurrentApplyToManyNamespaces(t *testing.T) {
	// The proxy sets namespaces up from several goroutines at once; each
	// must get its own rules and nothing of another's.
	forEachBackend(t, func(t *testing.T, backend string) {
		nat := newNAT(t, backend)
		const count = 6
		nss := make([]string, count)
		for i := range nss {
			nss[i] = newNetNS(t)
		}
		errs := make(chan error, count)
		var wg sync.WaitGroup
		for i, ns := range nss {
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs <- nat.Apply(ns, []uint16{6000 + uint16(i)}, 40000+uint16(i))
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Errorf("Apply: %v", err)
			}
		}
		for i, ns := range nss {
			if got, want := ours(save(t, ns, backend)), wantOurs(backend, 40000+uint16(i), 6000+uint16(i)); !slices.Equal(got, want) {
				t.Errorf("namespace %d got\n%s\nwant\n%s", i, strings.Join(got, "\n"), strings.Join(want, "\n"))
			}
		}
	})
}

// By a Handle's name the rules go into the Handle's namespace, and after the
// Handle is released Clear is a no-op that enters nothing: the rules of a
// namespace the name no longer names stay as they are.
func TestHandleNameEntersHandleOnly(t *testing.T) {
	forEachBackend(t, func(t *testing.T, backend string) {
		ns := newNetNS(t)
		nat := newNAT(t, backend)
		h, err := netns.Open(ns)
		if err != nil {
			t.Fatal(err)
		}
		if err := nat.Apply(h.Name(), []uint16{6000}, 40000); err != nil {
			t.Fatalf("Apply by handle: %v", err)
		}
		if p, err := nat.Port(ns); err != nil || p != 40000 {
			t.Errorf("Port by path after Apply by handle = %d, %v; want 40000", p, err)
		}
		name := h.Name()
		h.Release()
		if err := nat.Clear(name); err != nil {
			t.Errorf("Clear by a released handle's name: %v; want a no-op", err)
		}
		if p, err := nat.Port(ns); err != nil || p != 40000 {
			t.Errorf("Clear by a released handle touched the namespace: port %d, %v", p, err)
		}
		if err := nat.Apply(name, []uint16{7000}, 40001); !errors.Is(err, netns.ErrClosed) {
			t.Errorf("Apply by a released handle's name = %v; want ErrClosed", err)
		}
		if err := nat.Clear(ns); err != nil {
			t.Fatal(err)
		}
	})
}
