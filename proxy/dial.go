package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
)

// dialService resolves service and dials its endpoints, healthy ones first,
// until one connects or ctx ends. Endpoints the target policy refuses are
// skipped as if absent. The error names every endpoint's failure.
func (s *Server) dialService(ctx context.Context, sp *space, service string, sc *serviceCounters) (*net.TCPConn, netip.AddrPort, error) {
	// The slot is held for resolution too: a name whose DNS server
	// blackholes queries must not hold more goroutines in flight than a
	// blackholed endpoint.
	done, err := s.dialSlot(ctx, sp)
	if err != nil {
		return nil, netip.AddrPort{}, err
	}
	defer done()
	eps, err := s.Resolver.Lookup(ctx, service)
	if err != nil {
		return nil, netip.AddrPort{}, fmt.Errorf("resolving %s: %w", service, err)
	}
	if len(eps) == 0 {
		return nil, netip.AddrPort{}, fmt.Errorf("resolving %s: no endpoints", service)
	}
	eps = sc.health.order(eps)
	sc.setTried(eps)

	var errs []error
	dialled := 0
	for i, ep := range eps {
		if ctx.Err() != nil {
			errs = append(errs, fmt.Errorf("%s and %d more not tried: %w", ep, len(eps)-i-1, context.Cause(ctx)))
			break
		}
		c, err := s.dialEndpoint(ctx, ep)
		if err == nil {
			sc.health.succeeded(ep)
			if dialled > 0 {
				s.stats.failovers.Add(1)
			}
			return c, ep, nil
		}
		errs = append(errs, fmt.Errorf("%s: %w", ep, err))
		switch {
		case errors.Is(err, ErrTargetRefused):
			// Not the endpoint's failure, nor a failover: the endpoint
			// does not exist for this proxy.
			sc.refused.Add(1)
			s.logRefused(sp, service, ep, err)
			continue
		case localDialError(err):
			// This host ran out of ports or descriptors; the endpoint is
			// as good as it was.
		case ctx.Err() == nil:
			// A dial cut short by the whole phase's deadline (or by
			// Close) says nothing about the endpoint: only its own
			// timeout or refusal does.
			sc.health.failed(ep, err)
		}
		dialled++
	}
	return nil, netip.AddrPort{}, errors.Join(errs...)
}

// dialEndpoint dials one endpoint under the connect timeout, if the target
// policy lets it.
func (s *Server) dialEndpoint(ctx context.Context, ep netip.AddrPort) (*net.TCPConn, error) {
	// Checked here for every Dial, and again by the default dialer's
	// Control on the socket address it connects to.
	if err := s.policy.check(ep.Addr()); err != nil {
		return nil, err
	}
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
		d := net.Dialer{Control: s.policy.control}
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
