package resolver

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net/netip"
	"sync"
	"time"

	"github.com/miekg/dns"
)

// maxParallel bounds the A/AAAA queries in flight for the SRV targets that
// the additional section did not cover.
const maxParallel = 8

// resolve computes a fresh answer for v and the smallest TTL of the records
// it used. ip:port needs no DNS and lives as long as the ceiling allows.
func (r *Resolver) resolve(ctx context.Context, v parsedValue) (*answer, time.Duration, error) {
	switch v.kind {
	case kindAddrPort:
		return newAnswer([]srvRecord{{weight: 1, endpoints: []netip.AddrPort{v.addr}}}), r.maxTTL, nil
	case kindHostPort:
		res := r.resolveAddrs(ctx, v.name)
		if res.err != nil {
			return nil, 0, res.err
		}
		recs := make([]srvRecord, len(res.addrs))
		for i, a := range res.addrs {
			// Equal weights: a uniform shuffle of the addresses, and
			// Answer's callers see each with a share of its own.
			recs[i] = srvRecord{weight: 1, endpoints: []netip.AddrPort{netip.AddrPortFrom(a, v.port)}}
		}
		return newAnswer(recs), seconds(res.ttl), nil
	default:
		return r.resolveSRV(ctx, v.name)
	}
}

// resolveSRV looks up the SRV records of name and the addresses of their
// targets: first from the reply's answer and additional sections, matched by
// owner name, then by A and AAAA queries for the targets still missing.
func (r *Resolver) resolveSRV(ctx context.Context, name string) (*answer, time.Duration, error) {
	msg, server, err := r.query(ctx, name, dns.TypeSRV)
	if err != nil {
		return nil, 0, err
	}
	owners, ttl := aliases(msg.Answer, name)
	var srvs []*dns.SRV
	skipped := 0
	for _, rr := range msg.Answer {
		srv, ok := rr.(*dns.SRV)
		if !ok || !owners[canonical(srv.Hdr.Name)] {
			continue
		}
		if srv.Port == 0 || srv.Target == "." {
			// RFC 2782: target "." means the service is decidedly not
			// available at this domain; port 0 cannot be dialled.
			skipped++
			continue
		}
		srvs = append(srvs, srv)
	}
	if len(srvs) == 0 {
		why := "no SRV records in the answer"
		if skipped > 0 {
			why = fmt.Sprintf("all %d SRV records have port 0 or target \".\"", skipped)
		}
		return nil, 0, &Error{Kind: ErrNoEndpoints, Name: name, Type: "SRV", Server: server, Err: errors.New(why)}
	}

	known := map[string]*addrResult{}
	for _, section := range [][]dns.RR{msg.Answer, msg.Extra} {
		for _, rr := range section {
			addr, ok := rrAddr(rr)
			if !ok {
				continue // TXT (Consul sends node metadata there), OPT, ...
			}
			owner := canonical(rr.Header().Name)
			res := known[owner]
			if res == nil {
				res = &addrResult{ttl: math.MaxUint32}
				known[owner] = res
			}
			res.add(addr, rr.Header().Ttl)
		}
	}
	var missing []string
	for _, srv := range srvs {
		t := canonical(srv.Target)
		if _, ok := known[t]; !ok {
			known[t] = nil // placeholder, so each target is queried once
			missing = append(missing, t)
		}
	}
	for i, res := range r.resolveMany(ctx, missing) {
		known[missing[i]] = res
	}
	if err := ctx.Err(); err != nil {
		return nil, 0, fmt.Errorf("resolving SRV targets of %s: %w", name, context.Cause(ctx))
	}

	var recs []srvRecord
	var failure error
	for _, srv := range srvs {
		res := known[canonical(srv.Target)]
		if res.err != nil && !isAnswer(res.err) && failure == nil {
			failure = res.err
		}
		if len(res.addrs) == 0 {
			r.log.Debug("dns srv target has no address", "name", name, "target", srv.Target, "err", res.err)
			continue
		}
		eps := make([]netip.AddrPort, len(res.addrs))
		for i, a := range res.addrs {
			eps[i] = netip.AddrPortFrom(a, srv.Port)
		}
		recs = append(recs, srvRecord{priority: srv.Priority, weight: srv.Weight, endpoints: eps})
		ttl = min(ttl, srv.Hdr.Ttl, res.ttl)
	}
	if len(recs) == 0 {
		if failure != nil {
			return nil, 0, fmt.Errorf("resolving SRV targets of %s: %w", name, failure)
		}
		return nil, 0, &Error{Kind: ErrNoEndpoints, Name: name, Type: "SRV", Server: server,
			Err: fmt.Errorf("none of the %d SRV targets has an A or AAAA record", len(srvs))}
	}
	if failure != nil {
		// Some targets could not be resolved: use the others, and ask again
		// as soon as the floor allows.
		r.log.Debug("dns using partial answer", "name", name, "err", failure)
		ttl = 0
	}
	return newAnswer(recs), seconds(ttl), nil
}

// addrResult is the addresses found for one name and their smallest TTL.
type addrResult struct {
	addrs []netip.Addr
	ttl   uint32
	err   error
}

func (a *addrResult) add(addr netip.Addr, ttl uint32) {
	a.ttl = min(a.ttl, ttl)
	for _, x := range a.addrs {
		if x == addr {
			return
		}
	}
	a.addrs = append(a.addrs, addr)
}

// resolveMany resolves the addresses of several names, at most maxParallel
// at a time, and returns the results in the order of names.
func (r *Resolver) resolveMany(ctx context.Context, names []string) []*addrResult {
	out := make([]*addrResult, len(names))
	var wg sync.WaitGroup
	sem := make(chan struct{}, maxParallel)
	for i, name := range names {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			res := r.resolveAddrs(ctx, name)
			out[i] = &res
		})
	}
	wg.Wait()
	return out
}

// resolveAddrs queries the A and AAAA records of name, both at once. An
// address from either suffices; if one query failed, the TTL drops to 0 so
// the answer is refreshed as soon as the floor allows. Without addresses,
// NXDOMAIN wins over a failure (it is authoritative), a failure over an
// empty answer (the failed query might have had addresses).
func (r *Resolver) resolveAddrs(ctx context.Context, name string) addrResult {
	var six addrResult
	done := make(chan struct{})
	go r.queryAddrsInto(ctx, name, dns.TypeAAAA, &six, done)
	four := r.queryAddrs(ctx, name, dns.TypeA)
	<-done

	res := addrResult{addrs: append(four.addrs, six.addrs...), ttl: min(four.ttl, six.ttl)}
	failed := func(e error) bool { return e != nil && !isAnswer(e) }
	switch {
	case len(res.addrs) > 0:
		if failed(four.err) || failed(six.err) {
			res.ttl = 0
		}
	case errors.Is(four.err, ErrNoSuchName):
		res.err = four.err
	case errors.Is(six.err, ErrNoSuchName):
		res.err = six.err
	case failed(four.err):
		res.err = four.err
	case failed(six.err):
		res.err = six.err
	default:
		res.err = &Error{Kind: ErrNoEndpoints, Name: name, Type: "A/AAAA", Err: errors.New("no A or AAAA records")}
	}
	return res
}

// queryAddrsInto is queryAddrs run as a goroutine; it closes done when
// *res is set.
func (r *Resolver) queryAddrsInto(ctx context.Context, name string, qtype uint16, res *addrResult, done chan<- struct{}) {
	defer close(done)
	*res = r.queryAddrs(ctx, name, qtype)
}

// queryAddrs runs one A or AAAA query and collects the addresses of name
// (following CNAMEs in the answer).
func (r *Resolver) queryAddrs(ctx context.Context, name string, qtype uint16) addrResult {
	msg, _, err := r.query(ctx, name, qtype)
	if err != nil {
		return addrResult{ttl: math.MaxUint32, err: err}
	}
	owners, ttl := aliases(msg.Answer, name)
	res := addrResult{ttl: math.MaxUint32}
	for _, rr := range msg.Answer {
		if addr, ok := rrAddr(rr); ok && rr.Header().Rrtype == qtype && owners[canonical(rr.Header().Name)] {
			res.add(addr, min(ttl, rr.Header().Ttl))
		}
	}
	return res
}

// aliases returns name and the names it is an alias of through the CNAME
// records in answer (all canonical), and the smallest TTL of those CNAMEs
// (math.MaxUint32 without any).
func aliases(answer []dns.RR, name string) (map[string]bool, uint32) {
	owners := map[string]bool{name: true}
	ttl := uint32(math.MaxUint32)
	cur := name
	for range 8 { // a longer chain is a loop or abuse
		next := ""
		for _, rr := range answer {
			if c, ok := rr.(*dns.CNAME); ok && canonical(c.Hdr.Name) == cur {
				next = canonical(c.Target)
				ttl = min(ttl, c.Hdr.Ttl)
				break
			}
		}
		if next == "" || owners[next] {
			break
		}
		owners[next] = true
		cur = next
	}
	return owners, ttl
}

// rrAddr returns the address of an A or AAAA record. Unspecified addresses
// are refused: dialling 0.0.0.0 or :: reaches this host, not a backend.
func rrAddr(rr dns.RR) (netip.Addr, bool) {
	var a netip.Addr
	var ok bool
	switch rr := rr.(type) {
	case *dns.A:
		a, ok = netip.AddrFromSlice(rr.A.To4())
	case *dns.AAAA:
		a, ok = netip.AddrFromSlice(rr.AAAA.To16())
	}
	if !ok || a.IsUnspecified() {
		return netip.Addr{}, false
	}
	return a, true
}

// seconds converts a TTL; MaxUint32 (no record seen) stays large.
func seconds(ttl uint32) time.Duration { return time.Duration(ttl) * time.Second }
