package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"
)

// maxAttempts bounds the connection attempts one client connection has in
// flight at once, so that the namespace's dial slots still bound its
// SYN-SENT sockets (at most this many a slot).
const maxAttempts = 3

// attempt is the outcome of dialling one endpoint.
type attempt struct {
	i   int // index in the endpoints
	c   *net.TCPConn
	err error
}

// dialService resolves service and dials its endpoints, healthy ones first,
// until one connects or ctx ends. Endpoints the target policy refuses are
// skipped as if absent. The error names every endpoint's failure.
//
// The dials are staggered (Happy Eyeballs, RFC 8305, across endpoints
// rather than families): when an endpoint has not answered within the
// stagger delay, the next one is tried alongside it, and the first to
// connect wins. A host that went silent (its SYNs vanish, no reset) then
// costs a connection the stagger delay rather than the connect timeout, and
// several silent endpoints in a row do not add up their timeouts. An
// endpoint still silent when another answered a stagger delay or more after
// it was tried is put in back-off as if it had failed: it is tried after
// the others until it answers again.
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

	// Every attempt started is waited for before returning: the losers
	// are cancelled and their connections, if any, closed.
	actx, cancel := context.WithCancel(ctx)
	defer cancel()
	results := make(chan attempt, len(eps))
	started := make([]time.Time, len(eps))
	next, pending, first := 0, 0, -1
	var errs []error
	launch := func() {
		for next < len(eps) {
			i := next
			next++
			ep := eps[i]
			if err := s.policy.check(ep.Addr()); err != nil {
				// Not the endpoint's failure, nor a failover: the
				// endpoint does not exist for this proxy.
				errs = append(errs, fmt.Errorf("%s: %w", ep, err))
				sc.refused.Add(1)
				s.logRefused(sp, service, ep, err)
				continue
			}
			started[i] = time.Now()
			if first < 0 {
				first = i
			}
			pending++
			go func() {
				c, err := s.dialEndpoint(actx, ep)
				results <- attempt{i: i, c: c, err: err}
			}()
			return
		}
	}
	launch()
	stagger := time.NewTimer(s.connectStagger())
	defer stagger.Stop()
	for pending > 0 {
		select {
		case <-stagger.C:
			if pending < maxAttempts {
				launch()
			}
			stagger.Reset(s.connectStagger())
			continue
		case r := <-results:
			pending--
			ep := eps[r.i]
			if r.err == nil {
				cancel()
				s.settleLosers(results, pending, eps, started, ep, sc)
				sc.health.succeeded(ep)
				if r.i != first {
					// Another endpoint was tried first: it failed, or
					// was too slow and lost.
					s.stats.failovers.Add(1)
				}
				return r.c, ep, nil
			}
			errs = append(errs, fmt.Errorf("%s: %w", ep, r.err))
			switch {
			case errors.Is(r.err, ErrTargetRefused):
				// The dialer's Control refused the address (a check
				// above passed): the same as a refusal there.
				sc.refused.Add(1)
				s.logRefused(sp, service, ep, r.err)
			case localDialError(r.err):
				// This host ran out of ports or descriptors; the endpoint
				// is as good as it was.
			case ctx.Err() == nil:
				// A dial cut short by the whole phase's deadline (or by
				// Close) says nothing about the endpoint: only its own
				// timeout or refusal does.
				sc.health.failed(ep, r.err)
			}
			if ctx.Err() == nil {
				// A failure frees its turn at once.
				launch()
				stagger.Reset(s.connectStagger())
			}
		}
	}
	if next < len(eps) {
		errs = append(errs, fmt.Errorf("%s and %d more not tried: %w", eps[next], len(eps)-next-1, context.Cause(ctx)))
	}
	return nil, netip.AddrPort{}, errors.Join(errs...)
}

// settleLosers waits for the attempts still pending once winner connected
// (they were cancelled), closes what connected meanwhile, and puts in
// back-off those that had been silent for a stagger delay or more.
func (s *Server) settleLosers(results chan attempt, pending int, eps []netip.AddrPort, started []time.Time, winner netip.AddrPort, sc *serviceCounters) {
	now := time.Now()
	for ; pending > 0; pending-- {
		r := <-results
		if r.c != nil {
			r.c.Close()
			continue
		}
		if silent := now.Sub(started[r.i]); silent >= s.connectStagger() {
			sc.health.failed(eps[r.i], fmt.Errorf("no answer within %v, while %s answered", silent.Round(time.Millisecond), winner))
		}
	}
}

// dialEndpoint dials one endpoint under the connect timeout, if the target
// policy lets it, and bounds how long the connection may stay silent.
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
		d := net.Dialer{Control: s.policy.control, KeepAlive: -1}
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
	if err := s.boundSilence(tc); err != nil {
		tc.Close()
		return nil, err
	}
	return tc, nil
}

// boundSilence makes the kernel end a backend connection whose peer went
// silent (a host that lost power or was cut off, with no reset) within the
// backend timeout, rather than after 15 minutes of retransmissions or never
// (an idle connection): TCP_USER_TIMEOUT bounds how long sent data may stay
// unacknowledged, and keepalive probes find a silent peer of an idle
// connection. The relay then ends the client's side too.
func (s *Server) boundSilence(tc *net.TCPConn) error {
	d := s.backendTimeout()
	if d < 0 {
		return nil
	}
	// Idle for half the bound, then three probes over the other half.
	idle := max(d/2, time.Second)
	interval := max(d/6, time.Second)
	if err := tc.SetKeepAliveConfig(net.KeepAliveConfig{Enable: true, Idle: idle, Interval: interval, Count: 3}); err != nil {
		return fmt.Errorf("setting keepalive on the backend connection: %w", err)
	}
	raw, err := tc.SyscallConn()
	if err != nil {
		return fmt.Errorf("setting TCP_USER_TIMEOUT on the backend connection: %w", err)
	}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, int(d.Milliseconds()))
	}); err != nil {
		return fmt.Errorf("setting TCP_USER_TIMEOUT on the backend connection: %w", err)
	}
	if serr != nil {
		return fmt.Errorf("setting TCP_USER_TIMEOUT on the backend connection: %w", serr)
	}
	return nil
}
