package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
	"github.com/connectable/connectable/origdst"
	"golang.org/x/sys/unix"
)

// The tests drive the server through real loopback sockets. Instead of
// REDIRECT rules, a client encodes the port it pretends to have asked for in
// its source address, 127.1.<port high byte>.<port low byte>, and
// loopOrigDst decodes it. A client from any other address is "direct".

// loopListen opens the fake namespace listener: 127.0.0.1 only.
func loopListen(netns string, port uint16) (v4, v6 *net.TCPListener, err error) {
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: int(port)})
	return ln, nil, err
}

func loopOrigDst(c *net.TCPConn) (netip.AddrPort, error) {
	src := c.RemoteAddr().(*net.TCPAddr).AddrPort()
	a := src.Addr().Unmap().As4()
	if a[0] != 127 || a[1] != 1 {
		return netip.AddrPort{}, fmt.Errorf("reading original destination: %w", origdst.ErrNotRedirected)
	}
	return netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(a[2])<<8|uint16(a[3])), nil
}

// dialPort connects to the proxy listening on addr as a client redirected
// from port.
func dialPort(t testing.TB, addr netip.AddrPort, port uint16) *net.TCPConn {
	t.Helper()
	d := net.Dialer{
		LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 1, byte(port>>8), byte(port))},
		Control:   bindAddressNoPort,
		Timeout:   10 * time.Second,
	}
	c, err := d.Dial("tcp4", addr.String())
	if err != nil {
		t.Fatalf("dialing proxy %s as port %d: %v", addr, port, err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// bindAddressNoPort lets a client bound to an address share source ports
// across destinations. Without it bind picks a port no other socket on that
// address holds, TIME_WAIT ones included, and thousands of short
// connections from one address make each new bind slow.
func bindAddressNoPort(network, address string, c syscall.RawConn) error {
	var err error
	if cerr := c.Control(func(fd uintptr) {
		err = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1)
	}); cerr != nil {
		return cerr
	}
	return err
}

// proxyAddr returns where the server listens for key.
func proxyAddr(t testing.TB, s *Server, key string) netip.AddrPort {
	t.Helper()
	for _, ns := range s.Namespaces() {
		if ns.Key == key {
			return netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), ns.Port)
		}
	}
	t.Fatalf("no namespace %q applied", key)
	return netip.AddrPort{}
}

// fakeResolver serves a fixed table; shuffled entries come back in a fresh
// random order each time, like the real resolver's.
type fakeResolver struct {
	mu      sync.Mutex
	eps     map[string][]netip.AddrPort
	shuffle bool
	lookups map[string]int
}

func newResolver(shuffle bool) *fakeResolver {
	return &fakeResolver{eps: map[string][]netip.AddrPort{}, lookups: map[string]int{}, shuffle: shuffle}
}

func (r *fakeResolver) set(service string, eps ...netip.AddrPort) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.eps[service] = eps
}

func (r *fakeResolver) count(service string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.lookups[service]
}

func (r *fakeResolver) Lookup(ctx context.Context, service string) ([]netip.AddrPort, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lookups[service]++
	eps, ok := r.eps[service]
	if !ok {
		return nil, fmt.Errorf("no such service %q", service)
	}
	eps = slices.Clone(eps)
	if r.shuffle {
		rand.Shuffle(len(eps), func(i, j int) { eps[i], eps[j] = eps[j], eps[i] })
	}
	return eps, nil
}

// fakeRedirector records what the server asks of iptables.
type fakeRedirector struct {
	mu       sync.Mutex
	calls    []string
	applyErr error
	clearErr error
	port     uint16
}

func (r *fakeRedirector) Apply(netns string, ports []uint16, toPort uint16) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls = append(r.calls, fmt.Sprintf("apply %s %v %d", netns, ports, toPort))
	return r.applyErr
}

func (r *fakeRedirector) Clear(netns string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls = append(r.calls, "clear "+netns)
	return r.clearErr
}

func (r *fakeRedirector) Port(netns string) (uint16, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.port, nil
}

func (r *fakeRedirector) log() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.calls)
}

// testLogger sends the server's logs to the test's log.
func testLogger(t testing.TB, level slog.Level) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: level}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

// loopbackTargets lets test servers dial their backends on loopback, which
// the default target policy refuses.
var loopbackTargets = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128")}

// newServer returns a server on loopback with a shuffling resolver, closed
// when the test ends.
func newServer(t testing.TB, res *fakeResolver, mod func(*Server)) *Server {
	t.Helper()
	s := &Server{
		Resolver:       res,
		AllowTargets:   loopbackTargets,
		Listen:         loopListen,
		OrigDst:        loopOrigDst,
		ConnectTimeout: 2 * time.Second,
		DrainTimeout:   2 * time.Second,
		Logger:         testLogger(t, slog.LevelDebug),
	}
	if mod != nil {
		mod(s)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return s
}

// tagEcho writes tag, then echoes until EOF.
func tagEcho(tag byte) func(*net.TCPConn) {
	return func(c *net.TCPConn) {
		if _, err := c.Write([]byte{tag}); err != nil {
			return
		}
		io.Copy(c, c)
		c.CloseWrite()
	}
}

// readTag reads the tag a tagEcho backend sends first.
func readTag(t testing.TB, c net.Conn) byte {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	defer c.SetReadDeadline(time.Time{})
	var b [1]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		t.Fatalf("reading backend tag: %v", err)
	}
	return b[0]
}

// roundTrip checks that c echoes msg.
func roundTrip(t testing.TB, c net.Conn, msg string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatalf("writing %q: %v", msg, err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("reading echo of %q: %v", msg, err)
	}
	if string(got) != msg {
		t.Fatalf("echo: got %q; want %q", got, msg)
	}
}

// expectClosed checks that the proxy closes c without sending anything.
func expectClosed(t testing.TB, c net.Conn, within time.Duration) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(within))
	n, err := c.Read(make([]byte, 1))
	if n != 0 || err == nil {
		t.Fatalf("read %d bytes, err %v; want the connection closed", n, err)
	}
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatalf("connection still open after %v", within)
	}
}

// freePort returns a loopback address nobody listens on.
func freePort(t testing.TB) netip.AddrPort {
	t.Helper()
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().(*net.TCPAddr).AddrPort()
	ln.Close()
	return addr
}

// checkFDs fails the test if, when it ends, the process holds more file
// descriptors than now. Register it before anything that opens some.
func checkFDs(t *testing.T) {
	t.Helper()
	before := testenv.OpenFDs(t)
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for {
			// Splice keeps pipes in a sync.Pool; they are closed by
			// finalizers once two collections have emptied the pool.
			runtime.GC()
			n := testenv.OpenFDs(t)
			if n <= before {
				return
			}
			if time.Now().After(deadline) {
				t.Errorf("file descriptors leaked: %d before, %d after", before, n)
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
}

// waitFor polls cond until it is true, failing the test after a generous
// deadline.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func isRefused(err error) bool { return errors.Is(err, syscall.ECONNREFUSED) }
