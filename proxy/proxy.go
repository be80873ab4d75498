// Package proxy owns connectable's data path: one TCP listener per container
// network namespace, the port → service route table of that namespace, the
// dial to a live endpoint of the service (with failover and passive health)
// and the zero-copy relay between the two connections.
//
// A client inside the container connects to localhost:<port>; the namespace's
// iptables REDIRECT rule (installed through the Redirector) sends it to the
// proxy listener in the same namespace. The server reads the original
// destination port, maps it to the service named by the container's label,
// asks the Resolver for endpoints in the order to try, dials them from
// connectable's own namespace until one answers and copies bytes both ways
// with splice(2).
//
// Typical usage:
//
//	srv := &proxy.Server{Resolver: res, Redirector: nat, Logger: log}
//	defer srv.Close()
//	err := srv.Apply(ctx, containerID, "/proc/1234/ns/net", map[uint16]string{6379: "redis.service.consul"})
//	...
//	err = srv.Remove(ctx, containerID) // the container died
package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/connectable/connectable/netns"
	"github.com/connectable/connectable/origdst"
)

// Resolver returns the endpoints of a service in the order to try them.
type Resolver interface {
	Lookup(ctx context.Context, service string) ([]netip.AddrPort, error)
}

// Redirector installs the REDIRECT rules of one network namespace.
type Redirector interface {
	// Apply makes TCP connections to local addresses on ports go to toPort.
	Apply(netns string, ports []uint16, toPort uint16) error
	// Clear removes every rule Apply installed in netns.
	Clear(netns string) error
	// Port reports the port that rules of a previous run redirect to; 0 if none.
	Port(netns string) (uint16, error)
}

// ErrServerClosed is returned by Apply after Close.
var ErrServerClosed = errors.New("proxy server closed")

// Defaults for the zero values of Server's fields.
const (
	DefaultConnectTimeout = 3 * time.Second
	DefaultDialTimeout    = 10 * time.Second
	DefaultDrainTimeout   = 10 * time.Second
	// DefaultHalfCloseTimeout is long enough for a slow answer to a request
	// whose client half-closed after sending it.
	DefaultHalfCloseTimeout = time.Minute
)

// Server relays connections accepted in container namespaces to services.
// The zero value, with a Resolver set, is ready to use. Apply, Remove, Close,
// Stats and Namespaces may be called from any goroutine.
type Server struct {
	// Resolver returns the endpoints of a service. Required.
	Resolver Resolver
	// Redirector optionally installs the REDIRECT rules; if nil, no rules are
	// touched (tests, or someone else redirects).
	Redirector Redirector
	// Port optionally fixes the proxy port P in every namespace. If 0, Apply
	// first tries the port that Redirector.Port reports, so that rules of a
	// previous run keep working through a restart, and else lets the kernel
	// pick one.
	Port uint16
	// Listen optionally opens the listeners inside a namespace; if nil,
	// netns.Listen.
	Listen func(netns string, port uint16) (v4, v6 *net.TCPListener, err error)
	// OrigDst optionally reads a connection's original destination; if nil,
	// origdst.Get. Errors wrapping origdst.ErrNotRedirected mean a direct
	// connection to the proxy port.
	OrigDst func(*net.TCPConn) (netip.AddrPort, error)
	// Dial optionally dials an endpoint; if nil, a net.Dialer. It runs in
	// connectable's own namespace, so relayed traffic never meets the
	// container's REDIRECT rules. It must return a *net.TCPConn, which the
	// relay needs for splice(2).
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// ConnectTimeout optionally bounds the dial of one endpoint; if 0,
	// DefaultConnectTimeout.
	ConnectTimeout time.Duration
	// DialTimeout optionally bounds the whole dial phase of a connection,
	// resolution and failover included; if 0, DefaultDialTimeout.
	DialTimeout time.Duration
	// DrainTimeout optionally bounds how long Close lets live connections
	// finish before it closes them; if 0, DefaultDrainTimeout.
	DrainTimeout time.Duration
	// HalfCloseTimeout optionally bounds how long a relay waits for bytes in
	// its remaining direction once the other has ended (the peer sent FIN),
	// re-armed while bytes keep moving; if 0, DefaultHalfCloseTimeout. A
	// client that closed looks the same as one that only half-closed, so
	// without this bound a backend that never answers would hold the
	// relay forever (HAProxy's "timeout client-fin" and "server-fin").
	HalfCloseTimeout time.Duration
	// Logger optionally receives the server's logs; if nil, slog.Default().
	Logger *slog.Logger

	initOnce sync.Once
	log      *slog.Logger
	health   health
	stats    counters

	// mu serialises configuration (Apply, Remove, Close) and guards spaces.
	// The connection path never takes it.
	mu     sync.Mutex
	spaces map[string]*space
	closed bool
	done   chan struct{} // closed when Close has finished

	// connMu guards the live connections, which Close may have to cut.
	connMu  sync.Mutex
	conns   map[io.Closer]struct{} // client conns while dialling, then relays
	cutting bool
	// baseCtx parents every dial phase; Close cancels it when draining ends.
	baseCtx    context.Context
	baseCancel context.CancelFunc
	handlers   sync.WaitGroup // one per accepted connection
}

// space is the proxy's state in one network namespace.
type space struct {
	key, netns string
	port       uint16
	v4, v6     *net.TCPListener
	routes     atomic.Pointer[map[uint16]string]
	active     atomic.Int64
	stop       chan struct{} // closed to end the accept loops' back-off sleeps
	loops      sync.WaitGroup
}

func (s *Server) init() {
	s.initOnce.Do(func() {
		s.log = s.Logger
		if s.log == nil {
			s.log = slog.Default()
		}
		s.log = s.log.With("component", "proxy")
		s.spaces = make(map[string]*space)
		s.conns = make(map[io.Closer]struct{})
		s.done = make(chan struct{})
		s.baseCtx, s.baseCancel = context.WithCancel(context.Background())
		s.health.init()
	})
}

func (s *Server) listen(path string, port uint16) (v4, v6 *net.TCPListener, err error) {
	if s.Listen != nil {
		return s.Listen(path, port)
	}
	return netns.Listen(path, port)
}

func (s *Server) origDst(c *net.TCPConn) (netip.AddrPort, error) {
	if s.OrigDst != nil {
		return s.OrigDst(c)
	}
	return origdst.Get(c)
}

func (s *Server) connectTimeout() time.Duration {
	if s.ConnectTimeout > 0 {
		return s.ConnectTimeout
	}
	return DefaultConnectTimeout
}

func (s *Server) dialTimeout() time.Duration {
	if s.DialTimeout > 0 {
		return s.DialTimeout
	}
	return DefaultDialTimeout
}

func (s *Server) halfCloseTimeout() time.Duration {
	if s.HalfCloseTimeout > 0 {
		return s.HalfCloseTimeout
	}
	return DefaultHalfCloseTimeout
}

func (s *Server) drainTimeout() time.Duration {
	if s.DrainTimeout > 0 {
		return s.DrainTimeout
	}
	return DefaultDrainTimeout
}

// Apply makes the namespace at path netns, known by key, relay connections to
// the ports in routes to their services. It is idempotent: a second call with
// the same netns keeps the listener and only replaces the rules and routes; a
// call with another netns for the same key replaces everything. Connections
// already relayed are never disturbed.
func (s *Server) Apply(ctx context.Context, key, netns string, routes map[uint16]string) error {
	s.init()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrServerClosed
	}
	routes = maps.Clone(routes)
	ports := slices.Sorted(maps.Keys(routes))

	sp := s.spaces[key]
	if sp != nil && sp.netns == netns {
		// Ports being added need their route before their rule exists, ports
		// being removed keep theirs until their rule is gone: publish the
		// union while the rules change, the exact table afterwards.
		old := sp.routes.Load()
		union := make(map[uint16]string, len(*old)+len(routes))
		maps.Copy(union, *old)
		maps.Copy(union, routes)
		sp.routes.Store(&union)
		if s.Redirector != nil {
			if err := s.Redirector.Apply(netns, ports, sp.port); err != nil {
				sp.routes.Store(old)
				return fmt.Errorf("redirecting ports %v of %s to %d: %w", ports, key, sp.port, err)
			}
		}
		sp.routes.Store(&routes)
		return nil
	}
	if sp != nil {
		s.log.Info("namespace of key changed, replacing its listener", "key", key, "old", sp.netns, "netns", netns)
		if err := s.teardown(sp); err != nil {
			s.log.Warn("clearing rules of replaced namespace", "key", key, "netns", sp.netns, "err", err)
		}
		delete(s.spaces, key)
	}

	sp, err := s.open(key, netns)
	if err != nil {
		return err
	}
	if s.Redirector != nil {
		if err := s.Redirector.Apply(netns, ports, sp.port); err != nil {
			// Rules that point at a port nobody listens on would turn the
			// labelled ports into refused connections; take them back.
			if cerr := s.Redirector.Clear(netns); cerr != nil && !gone(netns) {
				s.log.Warn("clearing rules after failed apply", "key", key, "netns", netns, "err", cerr)
			}
			sp.closeListeners()
			return fmt.Errorf("redirecting ports %v of %s to %d: %w", ports, key, sp.port, err)
		}
	}
	sp.routes.Store(&routes)
	// Accepting starts only now that the routes are published; connections
	// that arrived since the listener opened wait in its backlog.
	for _, ln := range []*net.TCPListener{sp.v4, sp.v6} {
		if ln != nil {
			sp.loops.Add(1)
			go s.acceptLoop(sp, ln)
		}
	}
	s.spaces[key] = sp
	return nil
}

// open opens the listeners of a new space, on the configured port, on the
// port a previous run's rules point at, or on a port the kernel picks.
func (s *Server) open(key, netns string) (*space, error) {
	port := s.Port
	if port == 0 && s.Redirector != nil {
		p, err := s.Redirector.Port(netns)
		if err != nil {
			s.log.Warn("reading the port of existing rules", "key", key, "netns", netns, "err", err)
		}
		port = p
	}
	v4, v6, err := s.listen(netns, port)
	if err != nil && s.Port == 0 && port != 0 {
		s.log.Warn("previous proxy port unavailable, picking another", "key", key, "netns", netns, "port", port, "err", err)
		v4, v6, err = s.listen(netns, 0)
	}
	if err != nil {
		return nil, fmt.Errorf("listening in namespace %s of %s: %w", netns, key, err)
	}
	sp := &space{
		key:   key,
		netns: netns,
		port:  uint16(v4.Addr().(*net.TCPAddr).Port),
		v4:    v4,
		v6:    v6,
		stop:  make(chan struct{}),
	}
	if v6 == nil {
		s.log.Info("namespace has no IPv6 loopback, relaying IPv4 only", "key", key, "netns", netns, "port", sp.port)
	}
	return sp, nil
}

// Remove stops relaying for the namespace known by key: it clears the rules,
// closes the listeners and waits for their accept loops. Relayed connections
// go on until they end by themselves or Close cuts them. Removing an unknown
// key is not an error.
func (s *Server) Remove(ctx context.Context, key string) error {
	s.init()
	s.mu.Lock()
	defer s.mu.Unlock()
	sp := s.spaces[key]
	if sp == nil {
		return nil
	}
	delete(s.spaces, key)
	if err := s.teardown(sp); err != nil {
		return fmt.Errorf("removing %s: %w", key, err)
	}
	return nil
}

// teardown clears the space's rules, closes its listeners and waits for its
// accept loops. A namespace that no longer exists (its container died) is
// not an error.
func (s *Server) teardown(sp *space) error {
	var err error
	if s.Redirector != nil {
		if cerr := s.Redirector.Clear(sp.netns); cerr != nil && !gone(sp.netns) {
			err = fmt.Errorf("clearing rules in %s: %w", sp.netns, cerr)
		}
	}
	sp.closeListeners()
	return err
}

func (sp *space) closeListeners() {
	close(sp.stop)
	for _, ln := range []*net.TCPListener{sp.v4, sp.v6} {
		if ln != nil {
			ln.Close()
		}
	}
	sp.loops.Wait()
}

// gone reports whether the namespace file has disappeared, which means the
// namespace died with its container and took its rules along.
func gone(netns string) bool {
	if netns == "" {
		return false
	}
	_, err := os.Stat(netns)
	return errors.Is(err, fs.ErrNotExist)
}

// Close stops accepting in every namespace and clears the rules, lets live
// connections finish for DrainTimeout, then closes them, and returns once
// every goroutine the server started has ended. It is idempotent.
func (s *Server) Close() error {
	s.init()
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		<-s.done
		return nil
	}
	s.closed = true
	var errs []error
	for key, sp := range s.spaces {
		if err := s.teardown(sp); err != nil {
			errs = append(errs, fmt.Errorf("removing %s: %w", key, err))
		}
		delete(s.spaces, key)
	}
	s.mu.Unlock()

	drained := make(chan struct{})
	go s.waitHandlers(drained)
	timer := time.NewTimer(s.drainTimeout())
	select {
	case <-drained:
		timer.Stop()
	case <-timer.C:
		n := s.cut()
		s.log.Warn("drain timeout, closing live connections", "connections", n, "timeout", s.drainTimeout())
		<-drained
	}
	s.baseCancel()
	close(s.done)
	return errors.Join(errs...)
}

// waitHandlers closes drained once every connection handler has returned.
func (s *Server) waitHandlers(drained chan<- struct{}) {
	s.handlers.Wait()
	close(drained)
}

// cut aborts every dial in progress and closes every live connection, and
// makes track refuse new ones. It returns how many connections it closed.
func (s *Server) cut() int {
	s.baseCancel()
	s.connMu.Lock()
	defer s.connMu.Unlock()
	s.cutting = true
	for c := range s.conns {
		c.Close()
	}
	return len(s.conns)
}

// track registers a live connection so that Close can cut it. It reports
// false, and the caller must close c, when Close is already cutting.
func (s *Server) track(c io.Closer) bool {
	s.connMu.Lock()
	defer s.connMu.Unlock()
	if s.cutting {
		return false
	}
	s.conns[c] = struct{}{}
	return true
}

// retrack replaces old by c, with track's result.
func (s *Server) retrack(old, c io.Closer) bool {
	s.connMu.Lock()
	defer s.connMu.Unlock()
	if s.cutting {
		return false
	}
	delete(s.conns, old)
	s.conns[c] = struct{}{}
	return true
}

func (s *Server) untrack(c io.Closer) {
	s.connMu.Lock()
	delete(s.conns, c)
	s.connMu.Unlock()
}

// acceptLoop accepts connections on one listener of sp until it is closed.
func (s *Server) acceptLoop(sp *space, ln *net.TCPListener) {
	defer sp.loops.Done()
	var delay time.Duration
	for {
		c, err := ln.AcceptTCP()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of descriptors or memory: back off like net/http's
			// Server.Serve instead of spinning, and keep the listener.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			s.log.Error("accepting connection", "key", sp.key, "netns", sp.netns, "err", err, "retry", delay)
			select {
			case <-sp.stop:
				return
			case <-time.After(delay):
			}
			continue
		}
		delay = 0
		s.handlers.Add(1)
		go s.serveConn(sp, c)
	}
}
