package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
)

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
