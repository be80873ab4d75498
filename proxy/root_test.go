package proxy

import (
	"context"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
	"github.com/connectable/connectable/netns"
)

// execRedirector is a minimal test-only Redirector: iptables commands run
// inside the namespace through nsenter. The real one lives in iptables/,
// which proxy/ does not import.
type execRedirector struct{ t *testing.T }

const testChain = "CNT-PROXY-TEST"

func (r execRedirector) Apply(ns string, ports []uint16, toPort uint16) error {
	for _, cmd := range []string{"iptables", "ip6tables"} {
		testenv.Exec(r.t, ns, cmd, "-w", "-t", "nat", "-N", testChain)
		for _, p := range ports {
			testenv.Exec(r.t, ns, cmd, "-w", "-t", "nat", "-A", testChain, "-p", "tcp",
				"-m", "addrtype", "--dst-type", "LOCAL", "--dport", fmt.Sprint(p),
				"-j", "REDIRECT", "--to-ports", fmt.Sprint(toPort))
		}
		testenv.Exec(r.t, ns, cmd, "-w", "-t", "nat", "-A", "OUTPUT", "-j", testChain)
	}
	return nil
}

func (r execRedirector) Clear(ns string) error {
	for _, cmd := range []string{"iptables", "ip6tables"} {
		testenv.Exec(r.t, ns, cmd, "-w", "-t", "nat", "-D", "OUTPUT", "-j", testChain)
		testenv.Exec(r.t, ns, cmd, "-w", "-t", "nat", "-F", testChain)
		testenv.Exec(r.t, ns, cmd, "-w", "-t", "nat", "-X", testChain)
	}
	return nil
}

func (r execRedirector) Port(ns string) (uint16, error) { return 0, nil }

// dialIn connects from inside the namespace at ns: the socket is created
// there and stays there.
func dialIn(t *testing.T, ns, network, addr string) (net.Conn, error) {
	t.Helper()
	var c net.Conn
	err := netns.Do(ns, func() (err error) {
		c, err = net.DialTimeout(network, addr, 10*time.Second)
		return err
	})
	if c != nil {
		t.Cleanup(func() { c.Close() })
	}
	return c, err
}

// TestRedirectThroughNamespace runs the whole path for real: a client in a
// fresh namespace connects to localhost:<labelled port> over IPv4 and IPv6,
// REDIRECT sends it to the proxy's listener in that namespace, origdst.Get
// reads the port, and the proxy dials the backend from the test's own
// namespace.
func TestRedirectThroughNamespace(t *testing.T) {
	testenv.NeedRoot(t)
	testenv.NeedCommand(t, "iptables", "ip6tables", "nsenter")
	testenv.CheckGoroutines(t)
	testenv.GuardRootRules(t)
	ns := testenv.NewNetNS(t)
	checkFDs(t)

	a := testenv.StartBackend(t, tagEcho('a'))
	b := testenv.StartBackend(t, tagEcho('b'))
	res := newResolver(false)
	res.set("a.service", a.Addr)
	res.set("b.service", b.Addr)
	s := &Server{Resolver: res, AllowTargets: loopbackTargets, Redirector: execRedirector{t}, Logger: testLogger(t, -4)}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	if err := s.Apply(context.Background(), "c1", ns, map[uint16]string{6000: "a.service", 6001: "b.service"}); err != nil {
		t.Fatal(err)
	}
	st := s.Namespaces()
	if len(st) != 1 || !st[0].IPv6 || st[0].Port == 0 {
		t.Fatalf("namespace status: %+v; want one namespace with IPv6", st)
	}
	t.Logf("proxy port %d; rules:\n%s", st[0].Port, testenv.Exec(t, ns, "iptables", "-t", "nat", "-S"))

	for _, host := range []string{"127.0.0.1", "[::1]", "localhost"} {
		for port, tag := range map[uint16]byte{6000: 'a', 6001: 'b'} {
			addr := fmt.Sprintf("%s:%d", host, port)
			c, err := dialIn(t, ns, "tcp", addr)
			if err != nil {
				t.Fatalf("dialing %s in the namespace: %v", addr, err)
			}
			if got := readTag(t, c); got != tag {
				t.Errorf("%s reached backend %q; want %q", addr, got, tag)
			}
			roundTrip(t, c, "through REDIRECT to "+addr)
			c.Close()
		}
	}

	// No open relay: the proxy port itself, dialled directly, is closed
	// without a dial; an unlabelled port is simply not redirected.
	c, err := dialIn(t, ns, "tcp4", fmt.Sprintf("127.0.0.1:%d", st[0].Port))
	if err != nil {
		t.Fatal(err)
	}
	expectClosed(t, c, 10*time.Second)
	if _, err := dialIn(t, ns, "tcp4", "127.0.0.1:7000"); err == nil || !isRefused(err) {
		t.Errorf("unlabelled port: got %v; want connection refused", err)
	}
	waitFor(t, "the direct connection to be rejected", func() bool { return s.Stats().Rejected == 1 })
	// Remove puts the teardown off while connections live (linger_test.go).
	waitFor(t, "every connection to end", func() bool { st := s.Namespaces(); return len(st) == 1 && st[0].Active == 0 })

	if err := s.Remove(context.Background(), "c1"); err != nil {
		t.Fatal(err)
	}
	if out := testenv.Exec(t, ns, "iptables", "-t", "nat", "-S"); strings.Contains(out, testChain) {
		t.Errorf("rules left after Remove:\n%s", out)
	}
}
