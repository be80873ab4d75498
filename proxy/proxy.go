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
// Where things live:
//
//   - proxy.go: Server, its configuration, Apply, Remove and Close.
//   - namespace.go: the per-key lock (slot) and the state in one namespace
//     (space): listeners, routes, accept loops. Set-ups of different
//     namespaces never wait for each other, and Stats and Namespaces never
//     wait for a set-up.
//   - conn.go: conn, the owner of one accepted connection from accept to
//     finish (its counters, its tracking for Close, its one finish), and
//     connSet, through which Close waits for and aborts connections.
//   - dial.go: resolution and failover across endpoints.
//   - relay.go: the two copy directions of a conn, half-close, the reset
//     that ends a failed or cut relay.
//   - small.go: the small-message copy mode and its buffer pool, measured
//     by BenchmarkRequestResponse in small_test.go.
//   - health.go, stats.go: passive endpoint health, one table per service;
//     counters and status.
//   - the target policy, which addresses a dial may reach (loopback,
//     link-local and the like are refused unless allowed), is package
//     policy's, shared with the socket path.
//   - limits.go: what one namespace may take: its connection cap (and the
//     server's), its dial slots, its rate-limited connection logs.
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
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	endpointhealth "github.com/connectable/connectable/health"
	"github.com/connectable/connectable/netns"
	"github.com/connectable/connectable/origdst"
	"github.com/connectable/connectable/policy"
)

// Resolver returns the endpoints of a service in the order to try them.
type Resolver interface {
	Lookup(ctx context.Context, service string) ([]netip.AddrPort, error)
}

// Redirector installs the REDIRECT rules of one network namespace.
//
// The Server never overlaps two calls for one netns, and sets a new
// namespace up with Port, then (listeners opened) Apply, with no other call
// for that netns in between unless Apply is not reached, in which case
// Clear may follow. An implementation may therefore let that Apply reuse
// what Port read; iptables.NAT does, which saves about a third of a set-up.
// (Two keys naming one netns path would break this; keys are namespaces.)
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
	// DefaultConnectStagger is RFC 8305's connection attempt delay.
	DefaultConnectStagger = 250 * time.Millisecond
	// DefaultBackendTimeout ends a backend connection silent for 30 s.
	DefaultBackendTimeout = 30 * time.Second
	// DefaultHalfCloseTimeout is long enough for a slow answer to a request
	// whose client half-closed after sending it.
	DefaultHalfCloseTimeout = time.Minute
	// DefaultMaxConnsPerNamespace suits a file limit of 65536; connectable
	// derives its own from the limit it runs with.
	DefaultMaxConnsPerNamespace = 4096
	// DefaultMaxDialsPerNamespace lets a namespace open that many backend
	// connections at once: thousands a second with LAN dial times.
	DefaultMaxDialsPerNamespace = 128
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
	// KeepRules makes Close leave every served namespace's rules in place
	// instead of removing them: the next start finds their port
	// (Redirector.Port) and listens on it again, and a connect made in
	// between waits for it (the Redirector drops a SYN that finds no
	// listener, so the client's kernel sends it again) rather than being
	// refused. Rules of a namespace that lost its labels while connections
	// lived (see Remove) are removed all the same: nothing would take them
	// back.
	KeepRules bool
	// HalfCloseTimeout optionally bounds how long a relay waits for bytes in
	// its remaining direction once the other has ended (the peer sent FIN),
	// re-armed while bytes keep moving; if 0, DefaultHalfCloseTimeout. A
	// client that closed looks the same as one that only half-closed, so
	// without this bound a backend that never answers would hold the
	// relay forever (HAProxy's "timeout client-fin" and "server-fin").
	HalfCloseTimeout time.Duration
	// ConnectStagger optionally sets how long a dial waits for an endpoint
	// before trying the next one alongside it (the first to connect wins);
	// if 0, DefaultConnectStagger.
	ConnectStagger time.Duration
	// BackendTimeout optionally bounds how long a backend connection may
	// stay silent before the kernel ends it (TCP_USER_TIMEOUT, and
	// keepalive probes when idle), so that a connection to a host that
	// vanished ends rather than hanging; if 0, DefaultBackendTimeout; if
	// negative, the kernel's defaults (about 15 minutes with data in
	// flight, never when idle).
	BackendTimeout time.Duration
	// Policy optionally is the target policy, shared with the socket path;
	// if nil, policy.New(AllowTargets, DenyTargets). The check is made on
	// the address dialled, whether a label or DNS named it; a refused
	// endpoint is skipped as if absent and never counts against its
	// health.
	Policy *policy.Policy
	// AllowTargets optionally opens ranges of endpoint addresses that
	// policy.DefaultDeny closes, when Policy is nil; tests with backends
	// on loopback name 127.0.0.0/8 here.
	AllowTargets []netip.Prefix
	// DenyTargets optionally closes further ranges of endpoint addresses,
	// when Policy is nil. Of AllowTargets, DenyTargets and
	// policy.DefaultDeny, the most specific prefix that contains an
	// address decides, deny on a tie.
	DenyTargets []netip.Prefix
	// MaxConnsPerNamespace optionally caps the connections being dialled or
	// relayed at once for one namespace; further ones are reset at accept.
	// If 0, DefaultMaxConnsPerNamespace.
	MaxConnsPerNamespace int
	// MaxConns optionally caps the connections being dialled or relayed at
	// once over all namespaces, so that the server stays below its file
	// limit (two descriptors per relayed connection); if 0, no cap beyond
	// the per-namespace one.
	MaxConns int
	// MaxDialsPerNamespace optionally caps the dial phases running at once
	// for one namespace, so that connections to a blackholed backend hold
	// at most that many sockets in SYN-SENT (three times that for services
	// of several endpoints, whose attempts overlap: ConnectStagger); the
	// others wait (within DialTimeout) for a turn. If 0,
	// DefaultMaxDialsPerNamespace.
	MaxDialsPerNamespace int
	// Health optionally shares the relay's dial outcomes with the socket
	// path's endpoint health (sockpath's Path.Tracker): the relay's dials
	// are the daemon's own, so a failure confirms the endpoint dead for
	// both paths and a success brings it back; endpoints it holds dead are
	// dialled last.
	Health *endpointhealth.Tracker
	// Logger optionally receives the server's logs; if nil, slog.Default().
	Logger *slog.Logger

	initOnce sync.Once
	log      *slog.Logger
	health   healthConfig // what each service's health table starts from
	stats    counters
	policy   targetPolicy
	active   atomic.Int64 // connections between accept and finish, all namespaces

	// mu guards slots and closed, and is held only for operations on them:
	// never across a listen, an iptables run or any other wait, so that
	// one namespace's set-up never holds up another's, nor Stats.
	mu      sync.Mutex
	slots   map[string]*slot
	closed  bool
	closing chan struct{}  // closed when Close starts
	ops     sync.WaitGroup // Apply and Remove calls between acquire and release
	lingers sync.WaitGroup // lingerEnded's removals
	done    chan struct{}  // closed when Close has finished

	conns connSet // every accepted connection until it has finished
	// baseCtx parents every dial phase; Close cancels it when draining ends.
	baseCtx    context.Context
	baseCancel context.CancelFunc
}

func (s *Server) init() {
	s.initOnce.Do(func() {
		s.log = s.Logger
		if s.log == nil {
			s.log = slog.Default()
		}
		s.log = s.log.With("component", "proxy")
		s.slots = make(map[string]*slot)
		s.closing = make(chan struct{})
		s.done = make(chan struct{})
		s.conns.init()
		s.baseCtx, s.baseCancel = context.WithCancel(context.Background())
		s.health.init()
		s.health.tracker = s.Health
		s.policy = targetPolicy{s.Policy}
		if s.Policy == nil {
			s.policy.p = policy.New(s.AllowTargets, s.DenyTargets)
		}
	})
}

// ErrTargetRefused is wrapped by the error of a dial the target policy
// refused; nothing was sent to the address.
var ErrTargetRefused = policy.ErrRefused

// targetPolicy is the server's policy under the names its dials use.
type targetPolicy struct{ p *policy.Policy }

func (t targetPolicy) check(a netip.Addr) error { return t.p.Check(a) }

func (t targetPolicy) control(network, address string, c syscall.RawConn) error {
	return t.p.Control(network, address, c)
}

// CheckTarget applies the server's target policy to a: nil if the relay
// may dial it, else why not.
func (s *Server) CheckTarget(a netip.Addr) error {
	s.init()
	return s.policy.check(a)
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

func (s *Server) connectStagger() time.Duration {
	if s.ConnectStagger > 0 {
		return s.ConnectStagger
	}
	return DefaultConnectStagger
}

func (s *Server) backendTimeout() time.Duration {
	if s.BackendTimeout != 0 {
		return s.BackendTimeout
	}
	return DefaultBackendTimeout
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
//
// Calls for one key run one at a time; calls for different keys never wait
// for each other. If ctx ends while Apply waits for an earlier call on key,
// or before a new namespace's listener and rules are in place, Apply undoes
// what it did (listener closed, rules cleared) and returns ctx's error. Once
// the rules of an already applied namespace have been rewritten, Apply
// completes. After Close it returns ErrServerClosed.
func (s *Server) Apply(ctx context.Context, key, netns string, routes map[uint16]string) error {
	s.init()
	sl, err := s.acquire(ctx, key)
	if err != nil {
		return err
	}
	defer s.release(sl, true)
	if err := ctxDone(ctx, key); err != nil {
		return err
	}
	routes = maps.Clone(routes)
	ports := slices.Sorted(maps.Keys(routes))

	sp := sl.sp.Load()
	if sp != nil && sp.netns == netns {
		sp.lingering.Store(false) // labelled again
		return s.reapply(sp, ports, routes)
	}
	if sp != nil {
		s.log.Info("namespace of key changed, replacing its listener", "key", key, "old", sp.netns, "netns", netns)
		sl.sp.Store(nil)
		if err := s.teardown(sp); err != nil {
			s.log.Warn("clearing rules of replaced namespace", "key", key, "netns", sp.netns, "err", err)
		}
	}

	sp, err = s.open(key, netns)
	if err != nil {
		return err
	}
	if err := ctxDone(ctx, key); err != nil {
		sp.closeListeners()
		return err
	}
	if s.Redirector != nil {
		err := s.Redirector.Apply(netns, ports, sp.port)
		if err != nil {
			err = fmt.Errorf("redirecting ports %v of %s to %d: %w", ports, key, sp.port, err)
		} else {
			err = ctxDone(ctx, key)
		}
		if err != nil {
			// Rules that point at a port nobody listens on would turn the
			// labelled ports into refused connections; take them back.
			if cerr := s.Redirector.Clear(netns); cerr != nil && !gone(netns) {
				s.log.Warn("clearing rules after failed apply", "key", key, "netns", netns, "err", cerr)
			}
			sp.closeListeners()
			return err
		}
	}
	sp.routes.Store(&routes)
	// Accepting starts only now that the routes are published; connections
	// that arrived since the listener opened wait in its backlog.
	sp.serve(s)
	sl.sp.Store(sp)
	return nil
}

// reapply replaces the rules and routes of a space that keeps its listeners.
func (s *Server) reapply(sp *space, ports []uint16, routes map[uint16]string) error {
	// Ports being added need their route before their rule exists, ports
	// being removed keep theirs until their rule is gone: publish the
	// union while the rules change, the exact table afterwards.
	old := sp.routes.Load()
	union := make(map[uint16]string, len(*old)+len(routes))
	maps.Copy(union, *old)
	maps.Copy(union, routes)
	sp.routes.Store(&union)
	if s.Redirector != nil {
		if err := s.Redirector.Apply(sp.netns, ports, sp.port); err != nil {
			sp.routes.Store(old)
			return fmt.Errorf("redirecting ports %v of %s to %d: %w", ports, sp.key, sp.port, err)
		}
	}
	sp.routes.Store(&routes)
	return nil
}

// ctxDone returns ctx's error, naming key, once ctx has ended.
func ctxDone(ctx context.Context, key string) error {
	if ctx.Err() == nil {
		return nil
	}
	return fmt.Errorf("setting up %s: %w", key, context.Cause(ctx))
}

// Remove stops relaying for the namespace known by key: it clears the rules,
// closes the listeners and waits for their accept loops. Relayed connections
// are not closed, but in a namespace that outlives its rules they may not
// survive them: once its last REDIRECT rule is gone the kernel can stop
// tracking connections there, and the client's kernel then resets every
// connection it had redirected (seen on Linux 6.18 with iptables-nft; the
// usual caller removes namespaces that died, whose connections died with
// them). Removing an unknown
// key is not an error, nor is a Remove after Close, which removed everything.
// If ctx ends while Remove waits for an Apply on key, it returns ctx's error
// and leaves the namespace as it is.
func (s *Server) Remove(ctx context.Context, key string) error {
	s.init()
	sl, err := s.acquire(ctx, key)
	if errors.Is(err, ErrServerClosed) {
		return nil
	}
	if err != nil {
		return err
	}
	defer s.release(sl, true)
	if err := ctxDone(ctx, key); err != nil {
		return err
	}
	sp := sl.sp.Load()
	if sp == nil {
		return nil
	}
	if s.linger(sp) {
		return nil
	}
	sl.sp.Store(nil)
	if err := s.teardown(sp); err != nil {
		return fmt.Errorf("removing %s: %w", key, err)
	}
	return nil
}

// linger reports whether the removed space sp stays, rules and listeners,
// until its relayed connections end: its namespace lost its last labelled
// container but lives on (a container: group, a pod), and tearing down
// would leave its clients' connections without the rules that carry them
// and the port they expect. The last connection to end removes it
// (lingerEnded). A namespace that is gone is torn down at once. The
// caller holds sp's slot.
func (s *Server) linger(sp *space) bool {
	if sp.active.Load() == 0 || gone(sp.netns) {
		return false
	}
	if !sp.lingering.Swap(true) {
		s.log.Info("namespace no longer labelled; its rules and listener stay until its relayed connections end",
			"key", sp.key, "netns", sp.netns, "connections", sp.active.Load())
	}
	// The last connection may have ended before lingering was set, and
	// then did not see it.
	if sp.active.Load() == 0 {
		sp.lingering.Store(false)
		return false
	}
	return true
}

// lingerEnded is called when the last connection of a lingering space
// ends: the removal Remove put off runs now, on a goroutine of its own
// (the connection's owner must not wait for the key's lock), which Close
// waits for.
func (s *Server) lingerEnded(sp *space) {
	s.lingers.Add(1)
	go func() {
		defer s.lingers.Done()
		sl, err := s.acquire(context.Background(), sp.key)
		if err != nil {
			return // Close tears everything down
		}
		defer s.release(sl, true)
		// Apply may have taken the key back meanwhile, or a new
		// connection may have come.
		if sl.sp.Load() != sp || !sp.lingering.Load() || sp.active.Load() > 0 {
			return
		}
		sl.sp.Store(nil)
		if err := s.teardown(sp); err != nil {
			s.log.Warn("removing a namespace whose last connection ended", "key", sp.key, "netns", sp.netns, "err", err)
			return
		}
		s.log.Info("namespace removed after its last relayed connection ended", "key", sp.key, "netns", sp.netns)
	}()
}

// Close drains the server and stops it. Every namespace keeps serving new
// connections while the ones that were live when Close started finish, for
// at most DrainTimeout; those still open then are aborted (a reset on both
// sides, so neither peer takes a cut stream for a complete one). Then the
// listeners close, and the connections accepted meanwhile get what is left
// of DrainTimeout, and at least a second (DrainTimeout if shorter), before
// they are aborted too. The rules go last, unless KeepRules. Close returns
// once every goroutine the server started has ended. Apply and Remove calls
// in progress finish first; calls waiting for one return. Close is
// idempotent.
//
// Serving during the drain is what lets a restart go unnoticed: the
// listeners close only once the old connections are done, and only once
// their gates are closed (netns.Gate) and what they had queued is taken;
// from then on new connections wait in SYN retries (see KeepRules) for the
// next start, which follows within the young connections' second.
func (s *Server) Close() error {
	s.init()
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		<-s.done
		return nil
	}
	s.closed = true
	close(s.closing)
	s.mu.Unlock()

	// Nothing can take a slot any more; once the calls holding one are
	// done, every space left is Close's.
	s.ops.Wait()
	var spaces []*space
	for _, sl := range s.takeSlots() {
		if sp := sl.sp.Swap(nil); sp != nil {
			spaces = append(spaces, sp)
		}
	}

	drain := s.drainTimeout()
	start := time.Now()
	serving := time.NewTimer(drain)
	select {
	case <-s.conns.older():
		serving.Stop()
	case <-serving.C:
		n := s.conns.cutOlder()
		s.log.Warn("drain timeout, aborting live connections", "connections", n, "timeout", drain)
	}
	// Every gate first, so that no listener takes new connections while
	// the others' queues drain.
	for _, sp := range spaces {
		s.gate(sp)
	}
	for _, sp := range spaces {
		s.drained(sp)
		sp.closeListeners()
	}
	young := max(drain-time.Since(start), min(drain, time.Second))

	// The accept loops have ended: no connection joins s.conns any more.
	drained := make(chan struct{})
	go waitDrained(&s.conns, drained)
	timer := time.NewTimer(young)
	select {
	case <-drained:
		timer.Stop()
	case <-timer.C:
		s.baseCancel() // ends the dial phases
		n := s.conns.cut()
		s.log.Warn("drain timeout, aborting the connections accepted during the drain", "connections", n, "timeout", young)
		<-drained
	}
	s.baseCancel()
	s.lingers.Wait() // they found the server closing: the spaces are Close's

	// The rules go last. Removing a namespace's last REDIRECT rule can
	// switch connection tracking off there, and a redirected connection
	// whose translation is forgotten is reset by the client's kernel: the
	// drain would end at once. The aborts' resets, too, need the
	// translation to reach the client.
	var errs []error
	kept := 0
	for _, sp := range spaces {
		if s.KeepRules && !sp.lingering.Load() {
			sp.keepRules()
			kept++
			continue
		}
		if err := s.clearRules(sp); err != nil {
			errs = append(errs, fmt.Errorf("removing %s: %w", sp.key, err))
		}
	}
	if kept > 0 {
		s.log.Info("the relay's rules stay for the next start, which listens on their ports again (connectable cleanup removes them)", "namespaces", kept)
	}
	close(s.done)
	return errors.Join(errs...)
}

// waitDrained closes drained once every connection has finished.
func waitDrained(set *connSet, drained chan<- struct{}) {
	set.wait()
	close(drained)
}
