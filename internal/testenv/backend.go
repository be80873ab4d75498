package testenv

import (
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
)

// Backend is a real TCP server on loopback whose behaviour per connection
// the test chooses. It counts the connections it accepted and holds the
// live ones, so that Close (run when the test ends) can cut them.
type Backend struct {
	Addr     netip.AddrPort
	Accepted atomic.Int64

	ln     *net.TCPListener
	handle func(*net.TCPConn)
	mu     sync.Mutex
	conns  map[*net.TCPConn]struct{}
	wg     sync.WaitGroup
}

// StartBackend serves handle on a new listener on 127.0.0.1; the
// connection is closed when handle returns.
func StartBackend(t testing.TB, handle func(*net.TCPConn)) *Backend {
	t.Helper()
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatalf("backend listen: %v", err)
	}
	return ServeBackend(t, ln, handle)
}

// ServeBackend serves handle on ln, e.g. a listener on a port the test
// chose or in a namespace it made.
func ServeBackend(t testing.TB, ln *net.TCPListener, handle func(*net.TCPConn)) *Backend {
	b := &Backend{Addr: ln.Addr().(*net.TCPAddr).AddrPort(), ln: ln, handle: handle, conns: map[*net.TCPConn]struct{}{}}
	b.wg.Add(1)
	go b.serve()
	t.Cleanup(b.Close)
	return b
}

// Port returns the backend's port.
func (b *Backend) Port() uint16 { return b.Addr.Port() }

func (b *Backend) serve() {
	defer b.wg.Done()
	for {
		c, err := b.ln.AcceptTCP()
		if err != nil {
			return
		}
		b.Accepted.Add(1)
		b.mu.Lock()
		b.conns[c] = struct{}{}
		b.mu.Unlock()
		b.wg.Add(1)
		go func() {
			defer b.wg.Done()
			b.handle(c)
			c.Close()
			b.mu.Lock()
			delete(b.conns, c)
			b.mu.Unlock()
		}()
	}
}

// Live returns how many connections are open now.
func (b *Backend) Live() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.conns)
}

// Close stops the backend, cuts its connections and waits for their
// handlers. It is idempotent.
func (b *Backend) Close() {
	b.ln.Close()
	b.mu.Lock()
	for c := range b.conns {
		c.Close()
	}
	b.mu.Unlock()
	b.wg.Wait()
}

// Echo copies every byte back until the client half-closes.
func Echo(c *net.TCPConn) {
	_, _ = io.Copy(c, c)
	_ = c.CloseWrite()
}
