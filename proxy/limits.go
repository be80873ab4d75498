package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"syscall"
	"time"
)

// Limits: what one namespace may take of the server. Everything a
// container does costs the daemon descriptors, goroutines and log lines;
// the caps below keep one container from starving the others.

const (
	// logInterval is how often one namespace may log a line of one kind
	// about its connections; the lines in between are counted, and the next
	// line says how many were suppressed.
	logInterval = 10 * time.Second
	// refusedLogMax bounds the endpoints remembered per namespace as
	// already logged as refused; beyond it refusals are rate-limited like
	// other connection lines.
	refusedLogMax = 1024
)

func (s *Server) maxConnsPerNamespace() int64 {
	if s.MaxConnsPerNamespace > 0 {
		return int64(s.MaxConnsPerNamespace)
	}
	return DefaultMaxConnsPerNamespace
}

func (s *Server) maxDialsPerNamespace() int {
	if s.MaxDialsPerNamespace > 0 {
		return s.MaxDialsPerNamespace
	}
	return DefaultMaxDialsPerNamespace
}

// guard is a namespace's share of the limits: its dial slots and the state
// of its rate-limited logs.
type guard struct {
	once  sync.Once
	dials chan struct{} // a token per dial phase running

	mu      sync.Mutex
	refused map[netip.AddrPort]bool // endpoints whose refusal was logged
	logs    map[string]*logWindow   // by kind of line
}

type logWindow struct {
	last       time.Time
	suppressed int
}

func (g *guard) init(dials int) {
	g.once.Do(func() {
		g.dials = make(chan struct{}, dials)
		g.refused = make(map[netip.AddrPort]bool)
		g.logs = make(map[string]*logWindow)
	})
}

// admit counts a just accepted connection of sp against the caps. It
// reports false, with the connection not counted, when sp or the server is
// at its cap.
func (s *Server) admit(sp *space) bool {
	if n := sp.active.Add(1); n > s.maxConnsPerNamespace() {
		sp.active.Add(-1)
		s.stats.limitedNS.Add(1)
		s.logConn(sp, "cap", slog.LevelWarn, "namespace at its connection cap, resetting new connections",
			"key", sp.key, "cap", s.maxConnsPerNamespace())
		return false
	}
	if n := s.active.Add(1); s.MaxConns > 0 && n > int64(s.MaxConns) {
		s.active.Add(-1)
		sp.active.Add(-1)
		s.stats.limitedG.Add(1)
		s.logConn(sp, "global-cap", slog.LevelWarn, "server at its connection cap, resetting new connections",
			"key", sp.key, "cap", s.MaxConns)
		return false
	}
	return true
}

// unadmit takes back what admit counted.
func (s *Server) unadmit(sp *space) {
	s.active.Add(-1)
	if sp.active.Add(-1) == 0 && sp.lingering.Load() {
		s.lingerEnded(sp)
	}
}

// dialSlot waits for one of sp's dial slots; the caller runs done when its
// dial phase ends.
func (s *Server) dialSlot(ctx context.Context, sp *space) (done func(), err error) {
	sp.guard.init(s.maxDialsPerNamespace())
	select {
	case sp.guard.dials <- struct{}{}:
		return func() { <-sp.guard.dials }, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("waiting for one of the namespace's %d dial slots: %w", cap(sp.guard.dials), context.Cause(ctx))
	}
}

// logConn logs a line about one of sp's connections, at most one of each
// kind per logInterval.
func (s *Server) logConn(sp *space, kind string, level slog.Level, msg string, args ...any) {
	if !s.log.Enabled(context.Background(), level) {
		return
	}
	sp.guard.init(s.maxDialsPerNamespace())
	g := &sp.guard
	now := time.Now()
	g.mu.Lock()
	w := g.logs[kind]
	if w == nil {
		w = &logWindow{}
		g.logs[kind] = w
	}
	if !w.last.IsZero() && now.Sub(w.last) < logInterval {
		w.suppressed++
		g.mu.Unlock()
		return
	}
	n := w.suppressed
	w.last, w.suppressed = now, 0
	g.mu.Unlock()
	if n > 0 {
		args = append(args, "suppressed", n, "interval", logInterval)
	}
	s.log.Log(context.Background(), level, msg, args...)
}

// logRefused logs the refusal of ep once per namespace.
func (s *Server) logRefused(sp *space, service string, ep netip.AddrPort, err error) {
	sp.guard.init(s.maxDialsPerNamespace())
	g := &sp.guard
	g.mu.Lock()
	seen := g.refused[ep]
	full := len(g.refused) >= refusedLogMax
	if !seen && !full {
		g.refused[ep] = true
	}
	g.mu.Unlock()
	switch {
	case seen:
	case full:
		s.logConn(sp, "refused", slog.LevelWarn, "endpoint refused by the target policy",
			"key", sp.key, "service", service, "endpoint", ep, "err", err)
	default:
		s.log.Warn("endpoint refused by the target policy", "key", sp.key, "service", service, "endpoint", ep, "err", err)
	}
}

// localDialError reports whether a dial failed for want of something on
// this host (an ephemeral port, a descriptor, buffer memory) rather than
// because of the endpoint: such a failure must not put the endpoint in
// back-off for every other connection.
func localDialError(err error) bool {
	for _, errno := range []syscall.Errno{syscall.EADDRNOTAVAIL, syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM} {
		if errors.Is(err, errno) {
			return true
		}
	}
	return false
}
