package sockpath

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/connectable/connectable/internal/testenv"
	"github.com/connectable/connectable/netns"
	"github.com/connectable/connectable/resolver"
)

// fakeResolver answers from a table the test sets. The socket path's
// boundary is the Resolver interface; the real resolver is exercised
// end to end (e2e, with dnsmasq).
type fakeResolver struct {
	mu      sync.Mutex
	ttl     time.Duration
	answers map[string][]resolver.Group
	errs    map[string]error
}

func newFakeResolver(ttl time.Duration) *fakeResolver {
	return &fakeResolver{ttl: ttl, answers: map[string][]resolver.Group{}, errs: map[string]error{}}
}

func (f *fakeResolver) Answer(_ context.Context, svc string) (resolver.Answer, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.errs[svc]; err != nil {
		return resolver.Answer{}, err
	}
	g, ok := f.answers[svc]
	if !ok {
		return resolver.Answer{}, fmt.Errorf("%s: %w", svc, resolver.ErrNoSuchName)
	}
	return resolver.Answer{Groups: g, Expires: time.Now().Add(f.ttl)}, nil
}

func (f *fakeResolver) set(svc string, groups ...resolver.Group) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.answers[svc] = groups
}

// group is a priority group of single-address targets with the weights
// given (1 each if none).
func group(prio uint16, eps []netip.AddrPort, weights ...uint32) resolver.Group {
	g := resolver.Group{Priority: prio}
	for i, ep := range eps {
		w := uint32(1)
		if i < len(weights) {
			w = weights[i]
		}
		g.Targets = append(g.Targets, resolver.Target{Weight: w, Endpoints: []netip.AddrPort{ep}})
	}
	return g
}

// bpffs mounts a bpffs of the test's own and returns a pin directory in it.
func bpffs(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "bpf", "bpf", dir).CombinedOutput(); err != nil {
		testenv.Skipf(t, "cannot mount a bpffs: %v: %s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
		}
	})
	return dir + "/connectable"
}

// loadKernel loads the programs with pins in dir, and makes the test fail
// unless every program and map of theirs is gone from the kernel at its end.
func loadKernel(t *testing.T, dir string) *Kernel {
	t.Helper()
	testenv.NeedRoot(t)
	cg, err := Cgroup2Root()
	if err != nil {
		testenv.Skipf(t, "no cgroup2: %v", err)
	}
	k, err := Load(dir, cg)
	if err != nil {
		testenv.Skipf(t, "cannot load the socket path's programs: %v", err)
	}
	watchGone(t, k)
	return k
}

// watchGone records the kernel ids of k's programs and maps, and checks at
// the end of the test that none of them exists any more.
func watchGone(t *testing.T, k *Kernel) {
	t.Helper()
	var progs []ebpf.ProgramID
	for _, p := range k.programs() {
		info, err := p.prog.Info()
		if err != nil {
			t.Fatal(err)
		}
		id, _ := info.ID()
		progs = append(progs, id)
	}
	var maps []ebpf.MapID
	for _, m := range k.pinnedMaps() {
		info, err := m.Info()
		if err != nil {
			t.Fatal(err)
		}
		id, _ := info.ID()
		maps = append(maps, id)
	}
	t.Cleanup(func() {
		// Freeing goes through RCU: give it a moment.
		deadline := time.Now().Add(5 * time.Second)
		for {
			var left []string
			for _, id := range progs {
				if p, err := ebpf.NewProgramFromID(id); err == nil {
					p.Close()
					left = append(left, fmt.Sprintf("program %d", id))
				}
			}
			for _, id := range maps {
				if m, err := ebpf.NewMapFromID(id); err == nil {
					m.Close()
					left = append(left, fmt.Sprintf("map %d", id))
				}
			}
			if len(left) == 0 {
				return
			}
			if time.Now().After(deadline) {
				t.Errorf("still in the kernel after the test: %s", strings.Join(left, ", "))
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
}

// netnsWithAddrs returns a fresh namespace whose loopback device also
// holds addrs (prefixes), the test's stand-ins for backends elsewhere (this
// kernel has no dummy devices).
func netnsWithAddrs(t *testing.T, addrs ...string) string {
	t.Helper()
	ns := testenv.NewNetNS(t)
	for _, a := range addrs {
		testenv.Exec(t, ns, "ip", "addr", "add", a, "dev", "lo")
	}
	return ns
}

// backend listens on addr inside ns and answers every connection with its
// name and the peer it saw, then closes it.
type backend struct {
	name string
	addr netip.AddrPort
	ln   net.Listener
	wg   sync.WaitGroup
}

func startBackend(t *testing.T, ns, name, addr string) *backend {
	t.Helper()
	b := &backend{name: name}
	err := netns.Do(ns, func() error {
		var err error
		b.ln, err = net.Listen("tcp", addr)
		return err
	})
	if err != nil {
		t.Fatalf("backend %s on %s: %v", name, addr, err)
	}
	b.addr = netip.MustParseAddrPort(b.ln.Addr().String())
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		for {
			c, err := b.ln.Accept()
			if err != nil {
				return
			}
			fmt.Fprintf(c, "%s %s\n", name, c.RemoteAddr())
			c.Close()
		}
	}()
	t.Cleanup(b.stop)
	return b
}

func (b *backend) stop() {
	b.ln.Close()
	b.wg.Wait()
}

// dial connects to addr from inside ns and returns the first word of the
// answer (the backend's name) and the peer address the client's socket
// reports (getpeername).
func dial(ns, addr string) (name, peer string, err error) {
	return dialTimeout(ns, addr, 5*time.Second)
}

// dialTimeout is dial with a bound on the connect; 0 waits as long as the
// kernel does.
func dialTimeout(ns, addr string, timeout time.Duration) (name, peer string, err error) {
	var c net.Conn
	err = netns.Do(ns, func() error {
		var err error
		c, err = net.DialTimeout("tcp", addr, timeout)
		return err
	})
	if err != nil {
		return "", "", err
	}
	defer c.Close()
	peer = c.RemoteAddr().String()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c)
	if err != nil {
		return "", peer, err
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return "", peer, errors.New("empty answer")
	}
	return f[0], peer, nil
}

func mustDial(t *testing.T, ns, addr string) (name, peer string) {
	t.Helper()
	name, peer, err := dial(ns, addr)
	if err != nil {
		t.Fatalf("connecting to %s in %s: %v", addr, ns, err)
	}
	return name, peer
}

// eventually polls cond until it holds or the generous deadline passes.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting: %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func pinsLeft(dir string) []string {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}
