package proxy

import (
	"context"
	"errors"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/connectable/connectable/origdst"
)

// conn owns one accepted connection from accept to its end: the client and,
// once dialled, the backend; the gauges it holds up (its namespace's and its
// service's Active) and the byte counts it adds; its entry in the server's
// connSet, through which Close can abort it. It is ended exactly once, by
// finish, from whichever of its goroutines ends last: serve when the dial
// phase fails, else the second relay direction to end (relay.go).
//
// Its goroutines, in order: serve runs the dial phase (original destination
// → route → endpoints → the first that connects) and then starts copyUp and
// copyDown and returns. The copy goroutines start with small stacks, while
// serve's grew through resolution and dialling, and an idle relayed
// connection should not keep that stack alive.
type conn struct {
	srv    *Server
	sp     *space
	sc     *serviceCounters // nil until the connection has a route
	client *net.TCPConn
	// backend is set by connSet.attach, under the set's lock, so that cut
	// sees either no backend or the one the relay uses.
	backend *net.TCPConn
	ep      netip.AddrPort
	start   time.Time
	// up counts bytes from client to backend, down the other way. Each is
	// written by its direction before it decrements running, and read by
	// the one that brings running to zero.
	up, down copyResult
	running  atomic.Int32 // relay directions still copying
}

// startConn takes a just accepted client into a conn of its own and starts
// its dial phase.
func (s *Server) startConn(sp *space, client *net.TCPConn) {
	// At the cap the connection is reset at once: it holds no descriptor
	// and no goroutine, and the client sees the refusal instead of a hang.
	if !s.admit(sp) {
		abort(client)
		return
	}
	c := &conn{srv: s, sp: sp, client: client, start: time.Now()}
	if !s.conns.add(c) {
		s.unadmit(sp)
		abort(client)
		return
	}
	go c.serve()
}

// serve runs the dial phase and hands a connected pair to the relay.
func (c *conn) serve() {
	if !c.dial() {
		c.finish()
		return
	}
	c.running.Store(2)
	go copyUp(c)
	go copyDown(c)
}

// dial finds the client's service and connects to one of its endpoints. It
// reports false, after logging why, when there is nothing to relay to.
func (c *conn) dial() bool {
	s := c.srv
	src := c.client.RemoteAddr()
	dst, err := s.origDst(c.client)
	if err != nil {
		s.stats.rejected.Add(1)
		if errors.Is(err, origdst.ErrNotRedirected) {
			s.logConn(c.sp, "direct", slog.LevelWarn, "direct connection to proxy port refused", "key", c.sp.key, "src", src)
		} else {
			s.logConn(c.sp, "origdst", slog.LevelError, "reading original destination", "key", c.sp.key, "src", src, "err", err)
		}
		return false
	}
	service, ok := (*c.sp.routes.Load())[dst.Port()]
	if !ok {
		s.stats.rejected.Add(1)
		s.logConn(c.sp, "noroute", slog.LevelWarn, "no route for port", "key", c.sp.key, "src", src, "port", dst.Port())
		return false
	}

	c.sc = s.stats.service(service, s.health)
	c.sc.accepted.Add(1)
	c.sc.active.Add(1)
	ctx, cancel := context.WithTimeout(s.baseCtx, s.dialTimeout())
	backend, ep, err := s.dialService(ctx, c.sp, service, c.sc)
	cancel()
	if err != nil {
		c.sc.failed.Add(1)
		s.logConn(c.sp, "dial", slog.LevelWarn, "no endpoint reachable", "key", c.sp.key, "src", src, "service", service,
			"duration", time.Since(c.start), "err", err)
		return false
	}
	if !s.conns.attach(c, backend) {
		abort(backend) // Close is cutting; it has aborted the client
		return false
	}
	c.ep = ep
	return true
}

// finish ends the connection: it closes both sockets (already closed after
// a relay), takes back its gauges, adds its bytes, at debug level logs the
// one line of a relayed connection, and leaves the connSet last, so that
// Close, which waits for the set to empty, waits for all of it.
func (c *conn) finish() {
	defer c.srv.conns.remove(c)
	c.client.Close()
	if c.backend != nil {
		c.backend.Close()
	}
	c.srv.unadmit(c.sp)
	if c.sc != nil {
		c.sc.active.Add(-1)
		c.sc.bytesUp.Add(uint64(c.up.n))
		c.sc.bytesDown.Add(uint64(c.down.n))
	}
	log := c.srv.log
	if c.backend == nil || !log.Enabled(context.Background(), slog.LevelDebug) {
		return
	}
	attrs := []any{"key", c.sp.key, "src", c.client.RemoteAddr(), "service", c.sc.name, "backend", c.ep,
		"up", c.up.n, "down", c.down.n, "duration", time.Since(c.start)}
	if err := firstCause(c.up.err, c.down.err); err != nil {
		// A reset ends connections every day: worth the one line, not a
		// warning.
		attrs = append(attrs, "err", err)
	}
	log.Debug("connection closed", attrs...)
}

// abort cuts the connection with a reset on both sides; Close uses it after
// the drain. The relay directions then fail and finish as usual.
func (c *conn) abort() {
	abort(c.client)
	if c.backend != nil {
		abort(c.backend)
	}
}

// connSet is every conn between accept and finish, for Close: to wait for
// them to end, and to abort them when the drain time is over.
type connSet struct {
	mu      sync.Mutex
	conns   map[*conn]struct{}
	cutting bool
	live    sync.WaitGroup // one count per conn in the set
	// old is what the set held when older was called, and oldDone is
	// closed once the last of it has left.
	old     map[*conn]struct{}
	oldDone chan struct{}
}

func (cs *connSet) init() { cs.conns = make(map[*conn]struct{}) }

// add takes c in. It reports false, and the caller must close c's client,
// once Close is cutting.
func (cs *connSet) add(c *conn) bool {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	if cs.cutting {
		return false
	}
	cs.conns[c] = struct{}{}
	cs.live.Add(1)
	return true
}

// attach gives c its backend, with add's result.
func (cs *connSet) attach(c *conn, backend *net.TCPConn) bool {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	if cs.cutting {
		return false
	}
	c.backend = backend
	return true
}

// remove lets c go; it is the last thing c's finish does with the set.
func (cs *connSet) remove(c *conn) {
	cs.mu.Lock()
	delete(cs.conns, c)
	if _, ok := cs.old[c]; ok {
		delete(cs.old, c)
		if len(cs.old) == 0 {
			close(cs.oldDone)
		}
	}
	cs.mu.Unlock()
	cs.live.Done()
}

// cutOlder aborts the conns of older's set that are still in it, and
// returns how many.
func (cs *connSet) cutOlder() int {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	for c := range cs.old {
		c.abort()
	}
	return len(cs.old)
}

// older returns a channel that is closed once every conn in the set now
// has left it; conns added later do not count. Close calls it once.
func (cs *connSet) older() <-chan struct{} {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	cs.oldDone = make(chan struct{})
	cs.old = maps.Clone(cs.conns)
	if len(cs.old) == 0 {
		close(cs.oldDone)
	}
	return cs.oldDone
}

// cut aborts every connection in the set and refuses new ones. It returns
// how many it aborted.
func (cs *connSet) cut() int {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	cs.cutting = true
	for c := range cs.conns {
		c.abort()
	}
	return len(cs.conns)
}

// wait returns once every conn added has been removed.
func (cs *connSet) wait() { cs.live.Wait() }
