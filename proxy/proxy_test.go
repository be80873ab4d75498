package proxy

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
)

func TestRoutesSeveralPorts(t *testing.T) {
	testenv.CheckGoroutines(t)
	checkFDs(t)
	a := testenv.StartBackend(t, tagEcho('a'))
	b := testenv.StartBackend(t, tagEcho('b'))
	res := newResolver(true)
	res.set("a.service", a.Addr)
	res.set("b.service", b.Addr)
	red := &fakeRedirector{}
	s := newServer(t, res, func(s *Server) { s.Redirector = red })
	if err := s.Apply(context.Background(), "c1", "ns1", map[uint16]string{6000: "a.service", 6001: "b.service"}); err != nil {
		t.Fatal(err)
	}
	addr := proxyAddr(t, s, "c1")
	if got, want := red.log(), []string{"apply ns1 [6000 6001] " + itoa(addr.Port())}; !slices.Equal(got, want) {
		t.Errorf("redirector calls: got %q; want %q", got, want)
	}

	for range 3 {
		for port, tag := range map[uint16]byte{6000: 'a', 6001: 'b'} {
			c := dialPort(t, addr, port)
			if got := readTag(t, c); got != tag {
				t.Errorf("port %d reached backend %q; want %q", port, got, tag)
			}
			roundTrip(t, c, "hello through "+string(tag))
			c.Close()
		}
	}

	// No open relay: a port without a route and a direct connection are
	// closed without resolving or dialling anything.
	expectClosed(t, dialPort(t, addr, 7000), 10*time.Second)
	direct, err := net.Dial("tcp4", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer direct.Close()
	expectClosed(t, direct, 10*time.Second)

	waitFor(t, "connections to end", func() bool {
		st := s.Stats()
		return st.Services["a.service"].Active == 0 && st.Services["b.service"].Active == 0 && st.Namespaces["c1"] == 0
	})
	st := s.Stats()
	if st.Rejected != 2 {
		t.Errorf("rejected: got %d; want 2", st.Rejected)
	}
	if got := res.count("a.service") + res.count("b.service"); got != 6 {
		t.Errorf("lookups: got %d; want 6", got)
	}
	for _, name := range []string{"a.service", "b.service"} {
		ss := st.Services[name]
		msg := len("hello through a")
		if ss.Accepted != 3 || ss.Failed != 0 || ss.BytesUp != uint64(3*msg) || ss.BytesDown != uint64(3*(msg+1)) {
			t.Errorf("stats of %s: got %+v; want 3 accepted, %d bytes up, %d down", name, ss, 3*msg, 3*(msg+1))
		}
	}
	if a.Accepted.Load() != 3 || b.Accepted.Load() != 3 {
		t.Errorf("backends accepted %d and %d; want 3 each", a.Accepted.Load(), b.Accepted.Load())
	}
}

func itoa(p uint16) string {
	return netip.AddrPortFrom(netip.IPv4Unspecified(), p).String()[len("0.0.0.0:"):]
}

func TestFailoverClosedPort(t *testing.T) {
	testenv.CheckGoroutines(t)
	live := testenv.StartBackend(t, tagEcho('l'))
	dead := freePort(t)
	res := newResolver(false)
	res.set("svc", dead, live.Addr)
	s := newServer(t, res, nil)
	if err := s.Apply(context.Background(), "c1", "", map[uint16]string{6000: "svc"}); err != nil {
		t.Fatal(err)
	}
	c := dialPort(t, proxyAddr(t, s, "c1"), 6000)
	if got := readTag(t, c); got != 'l' {
		t.Fatalf("reached %q; want the live backend", got)
	}
	roundTrip(t, c, "after failover")
	st := s.Stats()
	if st.Failovers != 1 || st.DialFailures[dead] != 1 {
		t.Errorf("failovers %d, dial failures of %s %d; want 1 and 1", st.Failovers, dead, st.DialFailures[dead])
	}
}

func TestFailoverBlackhole(t *testing.T) {
	testenv.CheckGoroutines(t)
	live := testenv.StartBackend(t, tagEcho('l'))
	hole := testenv.Blackhole(t)
	res := newResolver(false)
	res.set("svc", hole, live.Addr)
	const connect, stagger = 3 * time.Second, 100 * time.Millisecond
	s := newServer(t, res, func(s *Server) { s.ConnectTimeout = connect; s.ConnectStagger = stagger })
	if err := s.Apply(context.Background(), "c1", "", map[uint16]string{6000: "svc"}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	c := dialPort(t, proxyAddr(t, s, "c1"), 6000)
	if got := readTag(t, c); got != 'l' {
		t.Fatalf("reached %q; want the live backend", got)
	}
	elapsed := time.Since(start)
	// The blackhole costs one stagger delay: at least that (it really
	// hung), and less than the connect timeout, which the dial no longer
	// waits out.
	if elapsed < stagger || elapsed >= connect {
		t.Errorf("failover past the blackhole took %v; want about %v, below the connect timeout %v", elapsed, stagger, connect)
	}
	roundTrip(t, c, "past the blackhole")
	// Silent while the live one answered, it is in back-off.
	if st := s.Stats(); st.DialFailures[hole] != 1 {
		t.Errorf("dial failures of the blackhole: got %d; want 1", st.DialFailures[hole])
	}
}

// Several silent endpoints in a row do not add up their connect timeouts:
// the attempts overlap, and the live endpoint answers a few stagger delays
// in.
func TestFailoverBlackholes(t *testing.T) {
	testenv.CheckGoroutines(t)
	live := testenv.StartBackend(t, tagEcho('l'))
	res := newResolver(false)
	res.set("svc", testenv.Blackhole(t), testenv.Blackhole(t), testenv.Blackhole(t), live.Addr)
	const connect, stagger = 2 * time.Second, 100 * time.Millisecond
	s := newServer(t, res, func(s *Server) { s.ConnectTimeout = connect; s.ConnectStagger = stagger })
	if err := s.Apply(context.Background(), "c1", "", map[uint16]string{6000: "svc"}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	c := dialPort(t, proxyAddr(t, s, "c1"), 6000)
	if got := readTag(t, c); got != 'l' {
		t.Fatalf("reached %q; want the live backend", got)
	}
	// Three attempts at once at most: the fourth endpoint waits for the
	// first silent one's connect timeout, once, not three of them.
	if elapsed := time.Since(start); elapsed >= 2*connect {
		t.Errorf("failover past three blackholes took %v; want below two connect timeouts (%v)", elapsed, 2*connect)
	}
	// Next time the silent ones are in back-off: the live one goes first.
	start = time.Now()
	c = dialPort(t, proxyAddr(t, s, "c1"), 6000)
	if got := readTag(t, c); got != 'l' {
		t.Fatalf("reached %q; want the live backend", got)
	}
	if elapsed := time.Since(start); elapsed >= stagger*5 {
		t.Errorf("a connection after the blackholes failed took %v; want the live endpoint first", elapsed)
	}
}

func TestAllEndpointsDead(t *testing.T) {
	testenv.CheckGoroutines(t)
	checkFDs(t)
	res := newResolver(true)
	res.set("refused", freePort(t), freePort(t), freePort(t))
	res.set("holes", testenv.Blackhole(t), testenv.Blackhole(t), testenv.Blackhole(t))
	res.set("empty")
	s := newServer(t, res, func(s *Server) {
		// Three blackholes at 5s each would take 15s: the phase's total
		// deadline must close the client long before.
		s.ConnectTimeout = 5 * time.Second
		s.DialTimeout = 500 * time.Millisecond
	})
	routes := map[uint16]string{6000: "refused", 6001: "holes", 6002: "empty", 6003: "unknown"}
	if err := s.Apply(context.Background(), "c1", "", routes); err != nil {
		t.Fatal(err)
	}
	addr := proxyAddr(t, s, "c1")
	for port, service := range routes {
		t.Run(service, func(t *testing.T) {
			start := time.Now()
			c := dialPort(t, addr, port)
			expectClosed(t, c, 8*time.Second)
			t.Logf("closed after %v", time.Since(start))
		})
	}
	waitFor(t, "failures to be counted", func() bool {
		st := s.Stats()
		for _, service := range routes {
			if st.Services[service].Failed != 1 {
				return false
			}
		}
		return true
	})
}

func TestHalfClose(t *testing.T) {
	testenv.CheckGoroutines(t)
	// The backend reads the whole request, up to the client's EOF, and only
	// then answers with its hash.
	be := testenv.StartBackend(t, func(c *net.TCPConn) {
		h := sha256.New()
		if _, err := io.Copy(h, c); err != nil {
			return
		}
		c.Write(h.Sum(nil))
		c.CloseWrite()
	})
	res := newResolver(false)
	res.set("svc", be.Addr)
	s := newServer(t, res, nil)
	if err := s.Apply(context.Background(), "c1", "", map[uint16]string{6000: "svc"}); err != nil {
		t.Fatal(err)
	}
	c := dialPort(t, proxyAddr(t, s, "c1"), 6000)
	c.SetDeadline(time.Now().Add(30 * time.Second))
	req := bytes.Repeat([]byte("request "), 1<<17) // 1 MiB
	if _, err := c.Write(req); err != nil {
		t.Fatal(err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("reading answer after half-close: %v", err)
	}
	if want := sha256.Sum256(req); !bytes.Equal(got, want[:]) {
		t.Errorf("answer: got %x; want %x", got, want)
	}
}

// TestHalfCloseTimeout: once the client has sent FIN, a backend that neither
// answers nor closes holds the relay only for HalfCloseTimeout, while a
// backend that keeps sending, however slowly, is never cut.
func TestHalfCloseTimeout(t *testing.T) {
	testenv.CheckGoroutines(t)
	const timeout = 300 * time.Millisecond
	testOver := make(chan struct{})
	silent := testenv.StartBackend(t, func(c *net.TCPConn) {
		io.Copy(io.Discard, c) // the request, up to the client's FIN
		<-testOver             // then neither answer nor close
	})
	t.Cleanup(func() { close(testOver) }) // runs before the backend's cleanup
	slow := testenv.StartBackend(t, func(c *net.TCPConn) {
		io.Copy(io.Discard, c)
		for i := 0; i < 8; i++ { // 8 bytes over 1.2 s, 4× the timeout
			time.Sleep(150 * time.Millisecond)
			if _, err := c.Write([]byte{'0' + byte(i)}); err != nil {
				return
			}
		}
		c.CloseWrite()
	})
	res := newResolver(false)
	res.set("silent", silent.Addr)
	res.set("slow", slow.Addr)
	s := newServer(t, res, func(s *Server) { s.HalfCloseTimeout = timeout })
	if err := s.Apply(context.Background(), "c1", "", map[uint16]string{6000: "silent", 6001: "slow"}); err != nil {
		t.Fatal(err)
	}

	c := dialPort(t, proxyAddr(t, s, "c1"), 6000)
	c.Write([]byte("request"))
	waitFor(t, "relay to the silent backend", func() bool { return s.Stats().Services["silent"].Active == 1 })
	start := time.Now()
	c.Close() // the client gives up entirely: the proxy sees only its FIN
	waitFor(t, "relay to the silent backend ended", func() bool { return s.Stats().Services["silent"].Active == 0 })
	// Generous upper bound: the timeout may be armed twice, and the
	// machine is slow and shared.
	if d := time.Since(start); d < timeout || d > 20*timeout {
		t.Errorf("relay to a silent backend ended %v after the client closed; want about %v", d, timeout)
	}

	c = dialPort(t, proxyAddr(t, s, "c1"), 6001)
	c.SetDeadline(time.Now().Add(30 * time.Second))
	c.Write([]byte("request"))
	c.CloseWrite()
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "01234567" {
		t.Errorf("slow backend after half-close: got %q, %v; want all 8 bytes and EOF", got, err)
	}
}

// stream writes size bytes of a pattern unique to seed, so that lost,
// duplicated or reordered chunks change the hash.
func stream(w io.Writer, seed byte, size int) ([]byte, error) {
	chunk := make([]byte, 1<<20)
	for i := range chunk {
		chunk[i] = byte(i*7) ^ seed
	}
	h := sha256.New()
	for i := 0; i < size/len(chunk); i++ {
		chunk[0], chunk[1], chunk[2] = byte(i), byte(i>>8), seed
		h.Write(chunk)
		if _, err := w.Write(chunk); err != nil {
			return nil, err
		}
	}
	return h.Sum(nil), nil
}

func TestIntegrityLarge(t *testing.T) {
	testenv.CheckGoroutines(t)
	const size = 256 << 20
	type result struct {
		sent, received []byte
		err            error
	}
	backendDone := make(chan result, 1)
	be := testenv.StartBackend(t, func(c *net.TCPConn) {
		var r result
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			h := sha256.New()
			_, r.err = io.Copy(h, c)
			r.received = h.Sum(nil)
		}()
		var err error
		r.sent, err = stream(c, 'B', size)
		c.CloseWrite()
		wg.Wait()
		r.err = errors.Join(r.err, err)
		backendDone <- r
	})
	res := newResolver(false)
	res.set("svc", be.Addr)
	s := newServer(t, res, nil)
	if err := s.Apply(context.Background(), "c1", "", map[uint16]string{6000: "svc"}); err != nil {
		t.Fatal(err)
	}
	c := dialPort(t, proxyAddr(t, s, "c1"), 6000)
	c.SetDeadline(time.Now().Add(2 * time.Minute))
	var client result
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		h := sha256.New()
		_, client.err = io.Copy(h, c)
		client.received = h.Sum(nil)
	}()
	sent, err := stream(c, 'C', size)
	if err != nil {
		t.Fatalf("sending: %v", err)
	}
	c.CloseWrite()
	wg.Wait()
	if client.err != nil {
		t.Fatalf("receiving: %v", client.err)
	}
	var b result
	select {
	case b = <-backendDone:
	case <-time.After(time.Minute):
		t.Fatal("backend never finished")
	}
	if b.err != nil {
		t.Fatalf("backend: %v", b.err)
	}
	if !bytes.Equal(b.received, sent) {
		t.Errorf("client → backend: hash %x received, %x sent", b.received, sent)
	}
	if !bytes.Equal(client.received, b.sent) {
		t.Errorf("backend → client: hash %x received, %x sent", client.received, b.sent)
	}
	waitFor(t, "byte counts", func() bool { return s.Stats().BytesDown == size })
	if st := s.Stats(); st.BytesUp != size || st.BytesDown != size {
		t.Errorf("bytes: got %d up, %d down; want %d each", st.BytesUp, st.BytesDown, size)
	}
}

func TestBalance(t *testing.T) {
	testenv.CheckGoroutines(t)
	tags := []byte("xyz")
	res := newResolver(true)
	var eps []netip.AddrPort
	for _, tag := range tags {
		eps = append(eps, testenv.StartBackend(t, tagEcho(tag)).Addr)
	}
	res.set("svc", eps...)
	s := newServer(t, res, func(s *Server) { s.Logger = testLogger(t, slog.LevelInfo) })
	if err := s.Apply(context.Background(), "c1", "", map[uint16]string{6000: "svc"}); err != nil {
		t.Fatal(err)
	}
	addr := proxyAddr(t, s, "c1")
	const total, workers = 3000, 8
	var (
		mu     sync.Mutex
		counts = map[byte]int{}
		wg     sync.WaitGroup
		next   = make(chan struct{})
	)
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range next {
				c := dialPort(t, addr, 6000)
				tag := readTag(t, c)
				c.Close()
				mu.Lock()
				counts[tag]++
				mu.Unlock()
			}
		}()
	}
	for range total {
		next <- struct{}{}
	}
	close(next)
	wg.Wait()
	// Binomial(3000, 1/3): mean 1000, standard deviation 26. ±200 is
	// nearly 8 deviations: a failure means a real bias, not bad luck.
	for _, tag := range tags {
		if n := counts[tag]; n < 800 || n > 1200 {
			t.Errorf("backend %q got %d of %d connections; want 1000±200 (all: %v)", tag, n, total, counts)
		}
	}
	t.Logf("shares: %v", counts)
}

func TestRouteSwapDuringRelay(t *testing.T) {
	testenv.CheckGoroutines(t)
	a := testenv.StartBackend(t, tagEcho('a'))
	b := testenv.StartBackend(t, tagEcho('b'))
	res := newResolver(false)
	res.set("a", a.Addr)
	res.set("b", b.Addr)
	red := &fakeRedirector{}
	s := newServer(t, res, func(s *Server) { s.Redirector = red })
	// A namespace may start with no routes at all (every label invalid).
	if err := s.Apply(context.Background(), "c1", "ns", nil); err != nil {
		t.Fatal(err)
	}
	if err := s.Apply(context.Background(), "c1", "ns", map[uint16]string{6000: "a"}); err != nil {
		t.Fatal(err)
	}
	addr := proxyAddr(t, s, "c1")
	old := dialPort(t, addr, 6000)
	if readTag(t, old) != 'a' {
		t.Fatal("first connection did not reach a")
	}
	roundTrip(t, old, "before the swap")

	if err := s.Apply(context.Background(), "c1", "ns", map[uint16]string{6000: "b", 6002: "a"}); err != nil {
		t.Fatal(err)
	}
	if got := proxyAddr(t, s, "c1"); got != addr {
		t.Errorf("re-apply moved the listener from %s to %s", addr, got)
	}
	roundTrip(t, old, "after the swap, still to a")
	if got := readTag(t, dialPort(t, addr, 6000)); got != 'b' {
		t.Errorf("new connection to 6000 reached %q; want b", got)
	}
	if got := readTag(t, dialPort(t, addr, 6002)); got != 'a' {
		t.Errorf("new connection to 6002 reached %q; want a", got)
	}
	roundTrip(t, old, "still alive")
	p := itoa(addr.Port())
	if got, want := red.log(), []string{"apply ns [] " + p, "apply ns [6000] " + p, "apply ns [6000 6002] " + p}; !slices.Equal(got, want) {
		t.Errorf("redirector calls: got %q; want %q", got, want)
	}
}

// startDrain applies one namespace to s, opens a connection through it,
// then starts Close and waits until Close has noted that connection as
// live. It returns the proxy's address, the connection and Close's result.
func startDrain(t *testing.T, s *Server) (netip.AddrPort, *net.TCPConn, <-chan error) {
	t.Helper()
	if err := s.Apply(context.Background(), "c1", "ns", map[uint16]string{6000: "svc"}); err != nil {
		t.Fatal(err)
	}
	addr := proxyAddr(t, s, "c1")
	old := dialPort(t, addr, 6000)
	readTag(t, old)
	closed := make(chan error, 1)
	go func() { closed <- s.Close() }()
	waitFor(t, "Close to note the live connections", func() bool {
		s.conns.mu.Lock()
		defer s.conns.mu.Unlock()
		return s.conns.oldDone != nil
	})
	return addr, old, closed
}

// waitClosed waits for Close's result and fails on an error.
func waitClosed(t *testing.T, closed <-chan error) {
	t.Helper()
	select {
	case err := <-closed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Close did not return once the connections ended")
	}
}

// TestCloseDrains: while the connections that were live when Close began
// finish, the namespace keeps serving new ones; then its listener closes,
// and Close waits for the connections it accepted meanwhile.
func TestCloseDrains(t *testing.T) {
	testenv.CheckGoroutines(t)
	checkFDs(t)
	be := testenv.StartBackend(t, tagEcho('e'))
	res := newResolver(false)
	res.set("svc", be.Addr)
	red := &fakeRedirector{}
	s := newServer(t, res, func(s *Server) {
		s.Redirector = red
		s.DrainTimeout = 5 * time.Minute // never reached: the clients end first
	})
	addr, old, closed := startDrain(t, s)
	// Served while the old connection lives.
	young := dialPort(t, addr, 6000)
	if got := readTag(t, young); got != 'e' {
		t.Fatalf("a connection made while draining reached %q; want e", got)
	}
	roundTrip(t, old, "while draining")
	select {
	case err := <-closed:
		t.Fatalf("Close returned (%v) while a connection was live", err)
	case <-time.After(100 * time.Millisecond):
	}
	endConn(t, old)
	waitFor(t, "the listener to close once the old connection ended", func() bool {
		c, err := net.Dial("tcp4", addr.String())
		if err == nil {
			c.Close()
		}
		return isRefused(err)
	})
	roundTrip(t, young, "accepted while draining, after the listener closed")
	select {
	case err := <-closed:
		t.Fatalf("Close returned (%v) while a connection accepted in the drain was live", err)
	case <-time.After(100 * time.Millisecond):
	}
	endConn(t, young)
	waitClosed(t, closed)
	if got := red.log(); !slices.Contains(got, "clear ns") {
		t.Errorf("redirector calls %q; want the rules cleared", got)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

// TestCloseDrainTimeoutSparesYoung: at DrainTimeout the connections that
// were live when Close began are aborted and the listener closes; one
// accepted during the drain still gets its second to finish.
func TestCloseDrainTimeoutSparesYoung(t *testing.T) {
	testenv.CheckGoroutines(t)
	checkFDs(t)
	be := testenv.StartBackend(t, tagEcho('e'))
	res := newResolver(false)
	res.set("svc", be.Addr)
	s := newServer(t, res, func(s *Server) { s.DrainTimeout = 2 * time.Second })
	addr, old, closed := startDrain(t, s)
	young := dialPort(t, addr, 6000)
	readTag(t, young)
	expectClosed(t, old, 30*time.Second)
	roundTrip(t, young, "after the old connection was aborted")
	endConn(t, young)
	waitClosed(t, closed)
}

// endConn half-closes c and reads it to its end.
func endConn(t *testing.T, c *net.TCPConn) {
	t.Helper()
	c.CloseWrite()
	if _, err := io.ReadAll(c); err != nil {
		t.Fatalf("reading to the end: %v", err)
	}
}

// TestCloseKeepsRules: with KeepRules, Close leaves a served namespace's
// rules for the next start.
func TestCloseKeepsRules(t *testing.T) {
	testenv.CheckGoroutines(t)
	be := testenv.StartBackend(t, tagEcho('e'))
	res := newResolver(false)
	res.set("svc", be.Addr)
	red := &fakeRedirector{}
	s := newServer(t, res, func(s *Server) {
		s.Redirector = red
		s.KeepRules = true
	})
	if err := s.Apply(context.Background(), "c1", "ns", map[uint16]string{6000: "svc"}); err != nil {
		t.Fatal(err)
	}
	c := dialPort(t, proxyAddr(t, s, "c1"), 6000)
	readTag(t, c)
	endConn(t, c)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if got := red.log(); slices.ContainsFunc(got, func(l string) bool { return strings.HasPrefix(l, "clear") }) {
		t.Errorf("redirector calls %q; want the rules kept", got)
	}
}

func TestCloseForcesAfterDrainTimeout(t *testing.T) {
	testenv.CheckGoroutines(t)
	checkFDs(t)
	be := testenv.StartBackend(t, tagEcho('e'))
	hole := testenv.Blackhole(t)
	res := newResolver(false)
	res.set("svc", be.Addr)
	res.set("hole", hole)
	s := newServer(t, res, func(s *Server) {
		s.DrainTimeout = 300 * time.Millisecond
		s.ConnectTimeout = time.Minute
		s.DialTimeout = time.Minute
	})
	if err := s.Apply(context.Background(), "c1", "", map[uint16]string{6000: "svc", 6001: "hole"}); err != nil {
		t.Fatal(err)
	}
	addr := proxyAddr(t, s, "c1")
	var idle []*net.TCPConn
	for range 3 {
		c := dialPort(t, addr, 6000)
		readTag(t, c)
		idle = append(idle, c)
	}
	dialing := dialPort(t, addr, 6001) // stuck dialing the blackhole
	waitFor(t, "four active connections", func() bool { return s.Stats().Namespaces["c1"] == 4 })

	start := time.Now()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	t.Logf("Close took %v", time.Since(start))
	for _, c := range append(idle, dialing) {
		expectClosed(t, c, 10*time.Second)
	}
	st := s.Stats()
	if st.Services["svc"].Active != 0 || st.Services["hole"].Active != 0 {
		t.Errorf("active after Close: %+v", st.Services)
	}
}

func TestRemoveThenApply(t *testing.T) {
	testenv.CheckGoroutines(t)
	checkFDs(t)
	be := testenv.StartBackend(t, tagEcho('e'))
	res := newResolver(false)
	res.set("svc", be.Addr)
	red := &fakeRedirector{}
	s := newServer(t, res, func(s *Server) { s.Redirector = red })
	ctx := context.Background()
	if err := s.Apply(ctx, "c1", "ns", map[uint16]string{6000: "svc"}); err != nil {
		t.Fatal(err)
	}
	addr := proxyAddr(t, s, "c1")
	live := dialPort(t, addr, 6000)
	readTag(t, live)

	if err := s.Remove(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
	if len(s.Namespaces()) != 0 {
		t.Errorf("namespaces after Remove: %+v", s.Namespaces())
	}
	if _, err := net.Dial("tcp4", addr.String()); !isRefused(err) {
		t.Errorf("dial after Remove: got %v; want connection refused", err)
	}
	roundTrip(t, live, "Remove does not cut relayed connections")
	if err := s.Remove(ctx, "c1"); err != nil {
		t.Errorf("second Remove: %v", err)
	}

	if err := s.Apply(ctx, "c1", "ns", map[uint16]string{6000: "svc"}); err != nil {
		t.Fatal(err)
	}
	c := dialPort(t, proxyAddr(t, s, "c1"), 6000)
	readTag(t, c)
	roundTrip(t, c, "after re-apply")
	p1, p2 := itoa(addr.Port()), itoa(proxyAddr(t, s, "c1").Port())
	if got, want := red.log(), []string{"apply ns [6000] " + p1, "clear ns", "apply ns [6000] " + p2}; !slices.Equal(got, want) {
		t.Errorf("redirector calls: got %q; want %q", got, want)
	}
}

func TestApplyFailureLeaksNothing(t *testing.T) {
	testenv.CheckGoroutines(t)
	checkFDs(t)
	var opened []netip.AddrPort
	red := &fakeRedirector{applyErr: errors.New("iptables exploded")}
	s := newServer(t, newResolver(false), func(s *Server) {
		s.Redirector = red
		s.Listen = func(netns string, port uint16) (v4, v6 *net.TCPListener, err error) {
			v4, v6, err = loopListen(netns, port)
			if err == nil {
				opened = append(opened, v4.Addr().(*net.TCPAddr).AddrPort())
			}
			return v4, v6, err
		}
	})
	err := s.Apply(context.Background(), "c1", "ns", map[uint16]string{6000: "svc"})
	if err == nil || !errors.Is(err, red.applyErr) {
		t.Fatalf("Apply: got %v; want the redirector's error", err)
	}
	if len(s.Namespaces()) != 0 {
		t.Errorf("namespaces after failed Apply: %+v", s.Namespaces())
	}
	if len(opened) != 1 {
		t.Fatalf("listeners opened: %v", opened)
	}
	if _, err := net.Dial("tcp4", opened[0].String()); !isRefused(err) {
		t.Errorf("dial to the failed namespace's listener: got %v; want connection refused", err)
	}
	if got := red.log(); len(got) != 2 || got[1] != "clear ns" {
		t.Errorf("redirector calls %q; want apply then clear", got)
	}

	// A failed re-apply keeps the namespace as it was.
	red.applyErr = nil
	if err := s.Apply(context.Background(), "c1", "ns", map[uint16]string{6000: "svc"}); err != nil {
		t.Fatal(err)
	}
	red.mu.Lock()
	red.applyErr = errors.New("iptables exploded again")
	red.mu.Unlock()
	if err := s.Apply(context.Background(), "c1", "ns", map[uint16]string{6001: "other"}); err == nil {
		t.Fatal("re-apply succeeded despite the redirector's error")
	}
	ns := s.Namespaces()
	if len(ns) != 1 || len(ns[0].Routes) != 1 || ns[0].Routes[0].Port != 6000 {
		t.Errorf("after failed re-apply: %+v; want the old routes", ns)
	}
}

func TestApplyNamespaceChange(t *testing.T) {
	testenv.CheckGoroutines(t)
	checkFDs(t)
	red := &fakeRedirector{}
	s := newServer(t, newResolver(false), func(s *Server) { s.Redirector = red })
	ctx := context.Background()
	if err := s.Apply(ctx, "c1", "ns-a", map[uint16]string{6000: "svc"}); err != nil {
		t.Fatal(err)
	}
	old := proxyAddr(t, s, "c1")
	if err := s.Apply(ctx, "c1", "ns-b", map[uint16]string{6000: "svc"}); err != nil {
		t.Fatal(err)
	}
	ns := s.Namespaces()
	if len(ns) != 1 || ns[0].NetNS != "ns-b" {
		t.Fatalf("namespaces: %+v", ns)
	}
	if ns[0].Port != old.Port() {
		if _, err := net.Dial("tcp4", old.String()); !isRefused(err) {
			t.Errorf("old listener: got %v; want connection refused", err)
		}
	}
	want := []string{"apply ns-a [6000] " + itoa(old.Port()), "clear ns-a", "apply ns-b [6000] " + itoa(ns[0].Port)}
	if got := red.log(); !slices.Equal(got, want) {
		t.Errorf("redirector calls: got %q; want %q", got, want)
	}
}

func TestPortChoice(t *testing.T) {
	testenv.CheckGoroutines(t)
	ctx := context.Background()
	t.Run("previous run's port", func(t *testing.T) {
		prev := freePort(t).Port()
		red := &fakeRedirector{port: prev}
		s := newServer(t, newResolver(false), func(s *Server) { s.Redirector = red })
		if err := s.Apply(ctx, "c1", "ns", nil); err != nil {
			t.Fatal(err)
		}
		if got := proxyAddr(t, s, "c1").Port(); got != prev {
			t.Errorf("port: got %d; want %d from the existing rules", got, prev)
		}
	})
	t.Run("previous run's port taken", func(t *testing.T) {
		taken, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		defer taken.Close()
		prev := uint16(taken.Addr().(*net.TCPAddr).Port)
		s := newServer(t, newResolver(false), func(s *Server) { s.Redirector = &fakeRedirector{port: prev} })
		if err := s.Apply(ctx, "c1", "ns", nil); err != nil {
			t.Fatal(err)
		}
		if got := proxyAddr(t, s, "c1").Port(); got == prev || got == 0 {
			t.Errorf("port: got %d; want another than the taken %d", got, prev)
		}
	})
	t.Run("fixed port", func(t *testing.T) {
		fixed := freePort(t).Port()
		s := newServer(t, newResolver(false), func(s *Server) {
			s.Port = fixed
			s.Redirector = &fakeRedirector{port: 1}
		})
		if err := s.Apply(ctx, "c1", "ns", nil); err != nil {
			t.Fatal(err)
		}
		if got := proxyAddr(t, s, "c1").Port(); got != fixed {
			t.Errorf("port: got %d; want %d", got, fixed)
		}
	})
}

func TestRemoveGoneNamespace(t *testing.T) {
	testenv.CheckGoroutines(t)
	ctx := context.Background()
	red := &fakeRedirector{clearErr: errors.New("no such namespace")}
	s := newServer(t, newResolver(false), func(s *Server) { s.Redirector = red })
	gonePath := t.TempDir() + "/ns-of-dead-container"
	if err := s.Apply(ctx, "dead", gonePath, nil); err != nil {
		t.Fatal(err)
	}
	if err := s.Remove(ctx, "dead"); err != nil {
		t.Errorf("Remove of a vanished namespace: %v", err)
	}
	if err := s.Apply(ctx, "alive", "/proc/self/ns/net", nil); err != nil {
		t.Fatal(err)
	}
	if err := s.Remove(ctx, "alive"); err == nil || !errors.Is(err, red.clearErr) {
		t.Errorf("Remove with failing Clear in a live namespace: got %v; want the error", err)
	}
	if len(s.Namespaces()) != 0 {
		t.Errorf("namespaces left: %+v", s.Namespaces())
	}
}

// TestDrainCutResets: a stream still flowing when the drain time is over is
// aborted on both sides. A client that read part of a longer response must
// see an error, not an EOF that would pass the truncated stream off as the
// whole; the backend must see its peer gone too.
func TestDrainCutResets(t *testing.T) {
	testenv.CheckGoroutines(t)
	checkFDs(t)
	backendErr := make(chan error, 1)
	be := testenv.StartBackend(t, func(c *net.TCPConn) {
		chunk := bytes.Repeat([]byte("response "), 1<<13) // 72 KiB
		for {
			if _, err := c.Write(chunk); err != nil {
				backendErr <- err
				return
			}
		}
	})
	res := newResolver(false)
	res.set("svc", be.Addr)
	s := newServer(t, res, func(s *Server) { s.DrainTimeout = 300 * time.Millisecond })
	if err := s.Apply(context.Background(), "c1", "", map[uint16]string{6000: "svc"}); err != nil {
		t.Fatal(err)
	}
	c := dialPort(t, proxyAddr(t, s, "c1"), 6000)
	c.SetDeadline(time.Now().Add(time.Minute))
	if _, err := io.CopyN(io.Discard, c, 650<<10); err != nil {
		t.Fatalf("reading the first 650 KiB: %v", err)
	}

	closed := make(chan error, 1)
	go func() { closed <- s.Close() }()
	n, err := io.Copy(io.Discard, c) // nil means EOF
	if err == nil {
		t.Errorf("the cut stream ended with EOF after %d more bytes; want an error", n)
	} else if !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("the cut stream ended with %v; want a reset", err)
	}
	if err := <-closed; err != nil {
		t.Errorf("Close: %v", err)
	}
	select {
	case err := <-backendErr:
		if !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.EPIPE) {
			t.Errorf("backend's write after the cut: %v; want a reset or broken pipe", err)
		}
	case <-time.After(30 * time.Second):
		t.Error("the backend's writes go on after the cut")
	}
}
