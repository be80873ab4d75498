package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/connectable/connectable/internal/backoff"
	"github.com/connectable/connectable/netns"
)

// slot is everything the server keeps for one key: the lock that runs the
// Apply and Remove calls for the key one at a time, and the space they
// applied. A slot lives in Server.slots while a call holds or waits for its
// lock, or while it has a space.
type slot struct {
	key string
	// lock holds a token while an Apply or Remove works on the key. A
	// channel rather than a mutex, so that waiting for it ends with the
	// caller's context.
	lock chan struct{}
	refs int // calls holding or waiting for lock; guarded by Server.mu
	// sp is the applied space, nil when there is none. Only the holder of
	// lock (or Close, once no call can take it) changes it; Stats and
	// Namespaces read it without waiting.
	sp atomic.Pointer[space]
}

// acquire takes the lock of key's slot, creating the slot if needed. It
// gives up when ctx ends or Close starts; on success the caller must call
// release(sl, true).
func (s *Server) acquire(ctx context.Context, key string) (*slot, error) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, ErrServerClosed
	}
	sl := s.slots[key]
	if sl == nil {
		sl = &slot{key: key, lock: make(chan struct{}, 1)}
		s.slots[key] = sl
	}
	sl.refs++
	s.ops.Add(1)
	s.mu.Unlock()

	select {
	case sl.lock <- struct{}{}:
		return sl, nil
	case <-ctx.Done():
		s.release(sl, false)
		return nil, fmt.Errorf("waiting for the set-up of %s in progress: %w", key, context.Cause(ctx))
	case <-s.closing:
		s.release(sl, false)
		return nil, ErrServerClosed
	}
}

// release undoes acquire, unlocking the slot if held, and forgets the slot
// once nobody uses it and it has no space.
func (s *Server) release(sl *slot, held bool) {
	if held {
		<-sl.lock
	}
	s.mu.Lock()
	sl.refs--
	if sl.refs == 0 && sl.sp.Load() == nil {
		delete(s.slots, sl.key)
	}
	s.mu.Unlock()
	s.ops.Done()
}

// takeSlots empties the slot table and returns what it held.
func (s *Server) takeSlots() []*slot {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*slot, 0, len(s.slots))
	for key, sl := range s.slots {
		out = append(out, sl)
		delete(s.slots, key)
	}
	return out
}

// spaces returns the applied spaces, for Stats and Namespaces.
func (s *Server) spaces() []*space {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*space, 0, len(s.slots))
	for _, sl := range s.slots {
		if sp := sl.sp.Load(); sp != nil {
			out = append(out, sp)
		}
	}
	return out
}

// space is the proxy's state in one network namespace: its listeners, their
// accept loops and its route table.
type space struct {
	key, netns string
	port       uint16
	v4, v6     *net.TCPListener
	routes     atomic.Pointer[map[uint16]string]
	active     atomic.Int64  // connections accepted here and not yet finished
	guard      guard         // this namespace's dial slots and log limits (limits.go)
	stop       chan struct{} // closed to end the accept loops' back-off sleeps
	loops      sync.WaitGroup
	// release drops the space's own reference to the netns.Handle that
	// netns names (a no-op for a path): the namespace stays the same one
	// until the space's rules are cleared, whoever handed it over. It runs
	// once ends, what the space still has to do in the namespace, is
	// done: close its listeners and, once it served (its rules went in),
	// clear its rules. Teardown clears first, Close closes first.
	release func()
	ends    atomic.Int32
	served  atomic.Bool
	// lingering is set when the space was removed while connections
	// lived: the last to end removes it (Server.linger).
	lingering atomic.Bool
}

// ended marks one of sp's last operations in its namespace done.
func (sp *space) ended() {
	if sp.ends.Add(-1) == 0 {
		sp.release()
	}
}

// open opens the listeners of a new space, on the configured port, on the
// port a previous run's rules point at, or on a port the kernel picks.
func (s *Server) open(key, netns string) (*space, error) {
	release, err := nsHold(netns)
	if err != nil {
		return nil, fmt.Errorf("namespace of %s: %w", key, err)
	}
	sp, err := s.openHeld(key, netns)
	if err != nil {
		release()
		return nil, err
	}
	sp.release = release
	sp.ends.Store(1) // closeListeners
	return sp, nil
}

func (s *Server) openHeld(key, netns string) (*space, error) {
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

// serve starts the accept loops of sp's listeners. Only a space whose rules
// are in is served: from now on its end includes clearRules.
func (sp *space) serve(s *Server) {
	sp.ends.Add(1)
	sp.served.Store(true)
	for _, ln := range []*net.TCPListener{sp.v4, sp.v6} {
		if ln != nil {
			sp.loops.Add(1)
			go s.acceptLoop(sp, ln)
		}
	}
}

// teardown clears the space's rules, closes its listeners and waits for its
// accept loops. A namespace that no longer exists (its container died) is
// not an error.
func (s *Server) teardown(sp *space) error {
	err := s.clearRules(sp)
	sp.closeListeners()
	return err
}

// clearRules removes the space's rules; see teardown.
func (s *Server) clearRules(sp *space) error {
	if sp.served.CompareAndSwap(true, false) {
		defer sp.ended()
	}
	if s.Redirector == nil {
		return nil
	}
	if err := s.Redirector.Clear(sp.netns); err != nil && !gone(sp.netns) {
		return fmt.Errorf("clearing rules in %s: %w", sp.netns, err)
	}
	return nil
}

// keepRules lets go of the space's rules without removing them: Close
// with KeepRules.
func (sp *space) keepRules() {
	if sp.served.CompareAndSwap(true, false) {
		sp.ended()
	}
}

// gate closes the gates of the space's listeners (netns.Gate): from now on
// new connections wait for the next listener on its port.
func (s *Server) gate(sp *space) {
	for _, ln := range []*net.TCPListener{sp.v4, sp.v6} {
		if ln == nil {
			continue
		}
		if err := netns.Gate(ln); err != nil {
			s.log.Warn("closing a listener's gate; connections queued when it closes are reset", "key", sp.key, "netns", sp.netns, "err", err)
		}
	}
}

// drained waits, briefly, for the accept loops to take what the space's
// gated listeners had queued.
func (s *Server) drained(sp *space) {
	for _, ln := range []*net.TCPListener{sp.v4, sp.v6} {
		if ln == nil {
			continue
		}
		if err := netns.Drained(ln, 100*time.Millisecond); err != nil {
			s.log.Warn("closing a listener with connections queued: they are reset", "key", sp.key, "netns", sp.netns, "err", err)
		}
	}
}

// closeListeners closes the space's listeners and waits for its accept
// loops; called once.
func (sp *space) closeListeners() {
	close(sp.stop)
	for _, ln := range []*net.TCPListener{sp.v4, sp.v6} {
		if ln != nil {
			ln.Close()
		}
	}
	sp.loops.Wait()
	sp.ended()
}

// gone reports whether the namespace no longer exists as far as the server
// can tell: its file disappeared, or the netns.Handle naming it was
// released. Its rules went with it, or are no longer ours to touch.
func gone(name string) bool { return netns.Gone(name) }

// nsHold is netns.Hold: the package's parameters named netns shadow it.
var nsHold = netns.Hold

// acceptLoop accepts connections on one listener of sp until it is closed,
// and hands each to a conn of its own.
func (s *Server) acceptLoop(sp *space, ln *net.TCPListener) {
	defer sp.loops.Done()
	retry := backoff.Backoff{Min: 5 * time.Millisecond, Max: time.Second}
	for {
		c, err := ln.AcceptTCP()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of descriptors or memory: back off like net/http's
			// Server.Serve instead of spinning, and keep the listener.
			delay := retry.Next()
			s.logConn(sp, "accept", slog.LevelError, "accepting connection", "key", sp.key, "netns", sp.netns, "err", err, "retry", delay)
			select {
			case <-sp.stop:
				return
			case <-time.After(delay):
			}
			continue
		}
		retry.Reset()
		s.startConn(sp, c)
	}
}
