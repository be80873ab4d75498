package proxy

import (
	"context"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
)

// lingerRedirector is execRedirector made idempotent, as the real one is:
// Apply replaces the rules, Clear of a deleted namespace succeeds.
type lingerRedirector struct{ execRedirector }

func (r lingerRedirector) Apply(ns string, ports []uint16, toPort uint16) error {
	if err := exec.Command("nsenter", "--net="+ns, "--", "iptables", "-w", "-t", "nat", "-S", testChain).Run(); err == nil {
		r.execRedirector.Clear(ns)
	}
	return r.execRedirector.Apply(ns, ports, toPort)
}

func (r lingerRedirector) Clear(ns string) error {
	if _, err := os.Stat(ns); err != nil {
		return nil
	}
	return r.execRedirector.Clear(ns)
}

// echoes reports whether c still carries a round trip, without failing.
func echoes(c interface {
	io.ReadWriter
	SetDeadline(time.Time) error
}, msg string) error {
	c.SetDeadline(time.Now().Add(5 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := io.WriteString(c, msg); err != nil {
		return err
	}
	got := make([]byte, len(msg))
	_, err := io.ReadFull(c, got)
	return err
}

// TestRemoveLingersWhileRelaying: a namespace removed from the desired
// state while it lives on (its last labelled container left a container:
// group or a pod) keeps its rules and listener while a relayed connection
// lives, so that connection is not reset; the rules go when it ends. A
// namespace that is gone is cleaned up at once, live connection or not.
func TestRemoveLingersWhileRelaying(t *testing.T) {
	testenv.NeedRoot(t)
	testenv.NeedCommand(t, "iptables", "ip6tables", "nsenter", "ip")
	testenv.CheckGoroutines(t)
	testenv.GuardRootRules(t)
	ns := testenv.NewNetNS(t)

	a := testenv.StartBackend(t, tagEcho('a'))
	res := newResolver(false)
	res.set("a.service", a.Addr)
	logs := &testenv.SyncBuffer{}
	s := &Server{Resolver: res, AllowTargets: loopbackTargets, Redirector: lingerRedirector{execRedirector{t}}, Logger: testenv.Logger(t, logs)}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	routes := map[uint16]string{6000: "a.service"}
	if err := s.Apply(context.Background(), "c1", ns, routes); err != nil {
		t.Fatal(err)
	}
	rules := func() string { return testenv.Exec(t, ns, "iptables", "-t", "nat", "-S") }
	c, err := dialIn(t, ns, "tcp4", "127.0.0.1:6000")
	if err != nil {
		t.Fatal(err)
	}
	if got := readTag(t, c); got != 'a' {
		t.Fatalf("reached %q; want a", got)
	}
	roundTrip(t, c, "before")

	if err := s.Remove(context.Background(), "c1"); err != nil {
		t.Fatal(err)
	}
	if err := echoes(c.(*net.TCPConn), "after Remove"); err != nil {
		t.Fatalf("the relayed connection did not survive Remove: %v", err)
	}
	if !strings.Contains(rules(), testChain) {
		t.Errorf("rules gone while a relayed connection lives:\n%s", rules())
	}
	if n := len(s.Namespaces()); n != 1 {
		t.Errorf("%d namespaces while one lingers; want 1", n)
	}
	// Still relayed a while later.
	time.Sleep(200 * time.Millisecond)
	roundTrip(t, c, "later")

	c.Close()
	waitFor(t, "the lingering namespace removed after its last connection", func() bool {
		return logs.Count("namespace removed after its last relayed connection ended") == 1
	})
	if out := rules(); strings.Contains(out, testChain) {
		t.Errorf("rules left after the last connection ended:\n%s", out)
	}
	if n := len(s.Namespaces()); n != 0 {
		t.Errorf("%d namespaces after the lingering one was removed", n)
	}

	// Labelled again while lingering: the namespace stays, served.
	if err := s.Apply(context.Background(), "c1", ns, routes); err != nil {
		t.Fatal(err)
	}
	c2, err := dialIn(t, ns, "tcp4", "127.0.0.1:6000")
	if err != nil {
		t.Fatal(err)
	}
	readTag(t, c2)
	if err := s.Remove(context.Background(), "c1"); err != nil {
		t.Fatal(err)
	}
	if err := s.Apply(context.Background(), "c1", ns, routes); err != nil {
		t.Fatal(err)
	}
	c2.Close()
	time.Sleep(200 * time.Millisecond)
	if len(s.Namespaces()) != 1 || !strings.Contains(rules(), testChain) {
		t.Errorf("a namespace labelled again while lingering was removed when its connection ended")
	}
	if err := s.Remove(context.Background(), "c1"); err != nil {
		t.Fatal(err)
	}
	if len(s.Namespaces()) != 0 {
		t.Errorf("a namespace without connections lingered")
	}

	// Gone: removed at once, whatever its connections.
	dead := testenv.NewNetNS(t)
	if err := s.Apply(context.Background(), "c2", dead, routes); err != nil {
		t.Fatal(err)
	}
	c3, err := dialIn(t, dead, "tcp4", "127.0.0.1:6000")
	if err != nil {
		t.Fatal(err)
	}
	readTag(t, c3)
	name := strings.TrimPrefix(dead, "/var/run/netns/")
	if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns del: %v: %s", err, out)
	}
	err = s.Remove(context.Background(), "c2")
	exec.Command("ip", "netns", "add", name).Run() // for NewNetNS's cleanup to delete
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Namespaces()) != 0 {
		t.Errorf("a gone namespace lingered: %+v", s.Namespaces())
	}
	if err := echoes(c3.(*net.TCPConn), "gone"); err != nil {
		t.Logf("the connection of the gone namespace: %v", err)
	}
	c3.Close()
}

// TestCloseKeepRulesClearsLingering: with KeepRules, Close leaves a served
// namespace's rules for the next start, but removes those of a namespace
// that lost its labels and only lingered for its connections: no start
// would take them back.
func TestCloseKeepRulesClearsLingering(t *testing.T) {
	testenv.NeedRoot(t)
	testenv.NeedCommand(t, "iptables", "ip6tables", "nsenter", "ip")
	testenv.CheckGoroutines(t)
	testenv.GuardRootRules(t)
	served, lingering := testenv.NewNetNS(t), testenv.NewNetNS(t)

	a := testenv.StartBackend(t, tagEcho('a'))
	res := newResolver(false)
	res.set("a.service", a.Addr)
	s := &Server{Resolver: res, AllowTargets: loopbackTargets, Redirector: lingerRedirector{execRedirector{t}},
		KeepRules: true, DrainTimeout: 200 * time.Millisecond, Logger: testLogger(t, slog.LevelDebug)}
	routes := map[uint16]string{6000: "a.service"}
	for key, ns := range map[string]string{"c1": served, "c2": lingering} {
		if err := s.Apply(context.Background(), key, ns, routes); err != nil {
			t.Fatal(err)
		}
	}
	c, err := dialIn(t, lingering, "tcp4", "127.0.0.1:6000")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	readTag(t, c)
	if err := s.Remove(context.Background(), "c2"); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	has := func(ns string) bool {
		return strings.Contains(testenv.Exec(t, ns, "iptables", "-t", "nat", "-S"), testChain)
	}
	if !has(served) {
		t.Errorf("the served namespace's rules were removed; want them kept for the next start")
	}
	if has(lingering) {
		t.Errorf("the lingering namespace's rules were kept; want them removed")
	}
	lingerRedirector{execRedirector{t}}.Clear(served)
}
