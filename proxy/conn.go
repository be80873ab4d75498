package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"time"

	"github.com/connectable/connectable/origdst"
)

// serveConn runs the dial phase of one accepted connection: original
// destination port → service → endpoints → the first one that connects. It
// then hands both connections to a relay and returns: the relay's two copy
// goroutines start with small stacks, while this one's grew through
// resolution and dialling, and an idle relayed connection should not keep
// that stack alive.
func (s *Server) serveConn(sp *space, client *net.TCPConn) {
	r := s.dialPhase(sp, client)
	if r == nil {
		s.handlers.Done()
		return
	}
	// The relay inherits this goroutine's count in s.handlers and adds
	// one for its second goroutine.
	s.handlers.Add(1)
	go copyUp(r)
	go copyDown(r)
}

// dialPhase returns the relay between client and the backend it dialled, or
// nil after closing client and logging why not.
func (s *Server) dialPhase(sp *space, client *net.TCPConn) *relay {
	sp.active.Add(1)
	if !s.track(client) {
		client.Close()
		sp.active.Add(-1)
		return nil
	}
	start := time.Now()
	src := client.RemoteAddr()
	fail := func() *relay {
		client.Close()
		s.untrack(client)
		sp.active.Add(-1)
		return nil
	}

	dst, err := s.origDst(client)
	if err != nil {
		s.stats.rejected.Add(1)
		if errors.Is(err, origdst.ErrNotRedirected) {
			s.log.Warn("direct connection to proxy port refused", "key", sp.key, "src", src)
		} else {
			s.log.Error("reading original destination", "key", sp.key, "src", src, "err", err)
		}
		return fail()
	}
	service, ok := (*sp.routes.Load())[dst.Port()]
	if !ok {
		s.stats.rejected.Add(1)
		s.log.Warn("no route for port", "key", sp.key, "src", src, "port", dst.Port())
		return fail()
	}

	sc := s.stats.service(service)
	sc.accepted.Add(1)
	sc.active.Add(1)
	ctx, cancel := context.WithTimeout(s.baseCtx, s.dialTimeout())
	backend, ep, err := s.dialService(ctx, service, sc)
	cancel()
	if err != nil {
		sc.failed.Add(1)
		sc.active.Add(-1)
		s.log.Warn("no endpoint reachable", "key", sp.key, "src", src, "service", service,
			"duration", time.Since(start), "err", err)
		return fail()
	}
	r := &relay{s: s, sp: sp, sc: sc, client: client, backend: backend, ep: ep, start: start}
	r.running.Store(2)
	if !s.retrack(client, r) {
		backend.Close()
		sc.active.Add(-1)
		return fail()
	}
	return r
}

// finish accounts for and logs a relay whose both directions have ended.
func (s *Server) finish(r *relay) {
	s.untrack(r)
	r.sp.active.Add(-1)
	r.sc.active.Add(-1)
	r.sc.bytesUp.Add(uint64(r.up.n))
	r.sc.bytesDown.Add(uint64(r.down.n))
	if !s.log.Enabled(context.Background(), slog.LevelDebug) {
		return
	}
	attrs := []any{"key", r.sp.key, "src", r.client.RemoteAddr(), "service", r.sc.name, "backend", r.ep,
		"up", r.up.n, "down", r.down.n, "duration", time.Since(r.start)}
	if err := firstCause(r.up.err, r.down.err); err != nil {
		// A reset ends connections every day: worth the one line, not a
		// warning.
		attrs = append(attrs, "err", err)
	}
	s.log.Debug("connection closed", attrs...)
}

// dialService resolves service and dials its endpoints, healthy ones first,
// until one connects or ctx ends. The error names every endpoint's failure.
func (s *Server) dialService(ctx context.Context, service string, sc *serviceCounters) (*net.TCPConn, netip.AddrPort, error) {
	eps, err := s.Resolver.Lookup(ctx, service)
	if err != nil {
		return nil, netip.AddrPort{}, fmt.Errorf("resolving %s: %w", service, err)
	}
	if len(eps) == 0 {
		return nil, netip.AddrPort{}, fmt.Errorf("resolving %s: no endpoints", service)
	}
	eps = s.health.order(eps)
	sc.setTried(eps)

	var errs []error
	for i, ep := range eps {
		if ctx.Err() != nil {
			errs = append(errs, fmt.Errorf("%s and %d more not tried: %w", ep, len(eps)-i-1, context.Cause(ctx)))
			break
		}
		c, err := s.dialEndpoint(ctx, ep)
		if err == nil {
			s.health.succeeded(ep)
			if i > 0 {
				s.stats.failovers.Add(1)
			}
			return c, ep, nil
		}
		// A dial cut short by the whole phase's deadline (or by Close) says
		// nothing about the endpoint: only its own timeout or refusal does.
		if ctx.Err() == nil {
			s.health.failed(ep, err)
		}
		errs = append(errs, fmt.Errorf("%s: %w", ep, err))
	}
	return nil, netip.AddrPort{}, errors.Join(errs...)
}

// dialEndpoint dials one endpoint under the connect timeout.
func (s *Server) dialEndpoint(ctx context.Context, ep netip.AddrPort) (*net.TCPConn, error) {
	ctx, cancel := context.WithTimeout(ctx, s.connectTimeout())
	defer cancel()
	var (
		c   net.Conn
		err error
	)
	if s.Dial != nil {
		c, err = s.Dial(ctx, "tcp", ep.String())
	} else {
		// Not Dialer.DialTCP: it binds before connecting even when given
		// no local address, a syscall more and an ephemeral port held
		// exclusively instead of shared across destinations.
		var d net.Dialer
		c, err = d.DialContext(ctx, "tcp", ep.String())
	}
	if err != nil {
		return nil, err
	}
	tc, ok := c.(*net.TCPConn)
	if !ok {
		// The relay splices between two TCP sockets; anything else would
		// silently fall back to copying through user space.
		c.Close()
		return nil, fmt.Errorf("dial returned %T, not *net.TCPConn", c)
	}
	return tc, nil
}
