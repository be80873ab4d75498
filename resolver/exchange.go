package resolver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"syscall"
	"time"

	"github.com/miekg/dns"
)

// ednsSize is the UDP payload size every query advertises. Consul without
// EDNS0 silently returns 3 of its instances and sets no TC bit; with 4096 it
// returns a dozen over UDP and sets TC beyond that.
const ednsSize = 4096

// query asks the servers, in turn, one question about name (fully
// qualified) and returns the first reply that answers it: NOERROR, or an
// *Error of kind ErrNoSuchName for NXDOMAIN, which is authoritative, so no
// further server is asked. A timeout, network error, malformed reply or
// other error code moves on to the next server. The search starts at the
// server that last answered, so a dead first server costs one timeout, not
// one per query.
func (r *Resolver) query(ctx context.Context, name string, qtype uint16) (*dns.Msg, string, error) {
	m := new(dns.Msg)
	m.SetQuestion(name, qtype)
	m.SetEdns0(ednsSize, false)

	typ := dns.TypeToString[qtype]
	start := int(r.preferred.Load())
	var attempts attemptErrors
	for i := range r.servers {
		si := (start + i) % len(r.servers)
		server := r.servers[si]
		in, err := r.exchange(ctx, server, m)
		if err == nil {
			switch in.Rcode {
			case dns.RcodeSuccess:
				r.preferred.Store(uint32(si))
				return in, server, nil
			case dns.RcodeNameError:
				r.preferred.Store(uint32(si))
				return nil, server, &Error{Kind: ErrNoSuchName, Name: name, Type: typ, Server: server}
			}
			kind := ErrServerFailure
			if in.Rcode == dns.RcodeRefused {
				kind = ErrRefused
			}
			err = &Error{Kind: kind, Name: name, Type: typ, Server: server, Err: fmt.Errorf("rcode %s", dns.RcodeToString[in.Rcode])}
		}
		if ctx.Err() != nil {
			return nil, "", fmt.Errorf("resolving %s %s: %w", name, typ, context.Cause(ctx))
		}
		r.stats.queryErrors.Add(1)
		var e *Error
		if !errors.As(err, &e) {
			e = &Error{Kind: ErrServerFailure, Name: name, Type: typ, Server: server, Err: err}
		}
		r.log.Debug("dns query failed", "name", name, "type", typ, "server", server, "err", e)
		attempts = append(attempts, e)
	}
	return nil, "", allFailed(name, typ, attempts)
}

// exchange sends m to one server over UDP, and again over TCP if the reply
// is truncated. Each transport gets the per-query timeout.
func (r *Resolver) exchange(ctx context.Context, server string, m *dns.Msg) (*dns.Msg, error) {
	in, err := r.exchangeOnce(ctx, r.udp, server, m)
	if in != nil && in.Truncated {
		// A truncated reply may also have failed to unpack: either way, TCP.
		r.stats.truncated.Add(1)
		in, err = r.exchangeOnce(ctx, r.tcp, server, m)
		if err == nil && in.Truncated {
			err = r.errorf(ErrMalformed, m, server, "truncated reply over TCP")
		}
	}
	return in, err
}

// exchangeOnce does one exchange over one transport and checks that the
// reply answers the question. It reads the reply itself, rather than
// through dns.Client.ExchangeContext, because that one honours only the
// context's deadline: a canceled caller would wait out the whole timeout.
func (r *Resolver) exchangeOnce(ctx context.Context, c *dns.Client, server string, m *dns.Msg) (*dns.Msg, error) {
	qctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	start := time.Now()
	in, err := r.roundTrip(qctx, c, server, m)
	r.stats.queries.Add(1)
	r.stats.queryNanos.Add(uint64(time.Since(start)))
	if err != nil {
		var ne net.Error
		switch {
		case in != nil && in.Truncated:
			return in, err
		case in != nil || errors.Is(err, dns.ErrId):
			// ReadMsg returns the message alongside an unpack error.
			return nil, r.errorf(ErrMalformed, m, server, "%s: %w", c.Net, err)
		case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
			return nil, r.errorf(ErrTimeout, m, server, "no reply over %s within %v", c.Net, r.timeout)
		case errors.Is(err, syscall.ECONNREFUSED):
			return nil, r.errorf(ErrRefused, m, server, "%s: %w", c.Net, err)
		default:
			return nil, r.errorf(ErrServerFailure, m, server, "%s: %w", c.Net, err)
		}
	}
	if !in.Response {
		return nil, r.errorf(ErrMalformed, m, server, "reply without the QR bit")
	}
	if in.Rcode == dns.RcodeFormatError && len(in.Question) == 0 {
		// Some servers reject EDNS0 this way; it is the server's failure.
		return nil, r.errorf(ErrServerFailure, m, server, "rcode FORMERR")
	}
	q := m.Question[0]
	if len(in.Question) != 1 || in.Question[0].Qtype != q.Qtype || in.Question[0].Qclass != q.Qclass ||
		!strings.EqualFold(in.Question[0].Name, q.Name) {
		return nil, r.errorf(ErrMalformed, m, server, "reply does not answer the question")
	}
	return in, nil
}

// roundTrip sends m and reads the reply with the same ID, until ctx ends.
func (r *Resolver) roundTrip(ctx context.Context, c *dns.Client, server string, m *dns.Msg) (*dns.Msg, error) {
	co, err := c.DialContext(ctx, server)
	if err != nil {
		return nil, err
	}
	defer co.Close()
	co.UDPSize = ednsSize
	if deadline, ok := ctx.Deadline(); ok {
		if err := co.SetDeadline(deadline); err != nil {
			return nil, err
		}
	}
	// Registered after SetDeadline, so cancellation always wins.
	stop := context.AfterFunc(ctx, func() { _ = co.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if err := co.WriteMsg(m); err != nil {
		return nil, err
	}
	for {
		in, err := co.ReadMsg()
		if err != nil || in.Id == m.Id {
			return in, err
		}
		if c.Net == "tcp" {
			return nil, dns.ErrId
		}
		// Over UDP, a datagram with another ID is not ours: keep reading.
	}
}

func (r *Resolver) errorf(kind error, m *dns.Msg, server, format string, args ...any) *Error {
	q := m.Question[0]
	return &Error{Kind: kind, Name: q.Name, Type: dns.TypeToString[q.Qtype], Server: server, Err: fmt.Errorf(format, args...)}
}
