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

// ours returns the lines of a save that mention our chain or comment.
func ours(save string) []string {
	var out []string
	for line := range strings.Lines(save) {
		if strings.Contains(line, iptables.Chain) || strings.Contains(line, "connectable") || strings.HasPrefix(line, "==") {
			out = append(out, strings.TrimSpace(line))
		}
	}
	return out
}

// wantOurs is what ours returns when the rules redirect ports to toPort.
func wantOurs(backend string, toPort uint16, ports ...uint16) []string {
	var out []string
	for _, fam := range []string{"iptables", "ip6tables"} {
		out = append(out, "== "+fam+"-"+backend+"-save", ":CONNECTABLE - []", "-A OUTPUT -j CONNECTABLE")
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
		leftovers := map[string][][]string{
			"duplicated jumps, stale rules, old port": {
				{"-N", "CONNECTABLE"},
				{"-A", "CONNECTABLE", "-p", "tcp", "-m", "addrtype", "--dst-type", "LOCAL", "--dport", "6000", "-m", "comment", "--comment", "connectable", "-j", "REDIRECT", "--to-ports", "39999"},
				{"-A", "CONNECTABLE", "-p", "tcp", "-m", "addrtype", "--dst-type", "LOCAL", "--dport", "7777", "-m", "comment", "--comment", "connectable", "-j", "REDIRECT", "--to-ports", "39999"},
				{"-A", "CONNECTABLE", "-p", "tcp", "--dport", "6000", "-j", "REDIRECT", "--to-ports", "39999"},
				{"-A", "OUTPUT", "-j", "CONNECTABLE"},
				{"-A", "OUTPUT", "-p", "tcp", "-j", "CONNECTABLE"},
				{"-A", "OUTPUT", "-j", "CONNECTABLE"},
			},
			"chain without jump": {
				{"-N", "CONNECTABLE"},
				{"-A", "CONNECTABLE", "-p", "tcp", "--dport", "7777", "-j", "REDIRECT", "--to-ports", "39999"},
			},
			"right rules, duplicated jump": {
				{"-N", "CONNECTABLE"},
				{"-A", "CONNECTABLE", "-p", "tcp", "-m", "addrtype", "--dst-type", "LOCAL", "--dport", "6000", "-m", "comment", "--comment", "connectable", "-j", "REDIRECT", "--to-ports", "PORT"},
				{"-A", "OUTPUT", "-j", "CONNECTABLE"},
				{"-I", "OUTPUT", "1", "-j", "CONNECTABLE"},
			},
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
						testenv.Exec(t, ns, prog, append([]string{"-t", "nat"}, args...)...)
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
