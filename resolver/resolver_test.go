package resolver

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
	"github.com/miekg/dns"
)

func lookup(t testing.TB, r *Resolver, value string) []netip.AddrPort {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	eps, err := r.Lookup(ctx, value)
	if err != nil {
		t.Fatalf("Lookup(%q): %v", value, err)
	}
	return eps
}

func lookupErr(t testing.TB, r *Resolver, value string) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	eps, err := r.Lookup(ctx, value)
	if err == nil {
		t.Fatalf("Lookup(%q) = %v; want an error", value, eps)
	}
	return err
}

// sorted returns the endpoints as sorted strings, to compare sets.
func sorted(eps []netip.AddrPort) []string {
	out := make([]string, len(eps))
	for i, ep := range eps {
		out[i] = ep.String()
	}
	slices.Sort(out)
	return out
}

func wantSet(t testing.TB, got []netip.AddrPort, want ...string) {
	t.Helper()
	slices.Sort(want)
	if g := sorted(got); !slices.Equal(g, want) {
		t.Fatalf("endpoints = %v; want %v", g, want)
	}
}

// Three targets with distinct ports, so pairing a port with the wrong
// address shows.
const svc = "_web._tcp.service.test."

func srvRecords(t testing.TB) []dns.RR {
	return rrs(t,
		svc+" 30 IN SRV 1 1 8001 one.node.test.",
		svc+" 30 IN SRV 1 1 8002 two.node.test.",
		svc+" 30 IN SRV 1 1 8003 three.node.test.",
	)
}

func addrRecords(t testing.TB) []dns.RR {
	return rrs(t,
		"one.node.test. 30 IN A 127.0.0.1",
		"two.node.test. 30 IN A 127.0.0.2",
		"two.node.test. 30 IN AAAA ::2",
		"three.node.test. 30 IN AAAA fd00::3",
	)
}

var wantWeb = []string{"127.0.0.1:8001", "127.0.0.2:8002", "[::2]:8002", "[fd00::3]:8003"}

func TestAdditionalPresent(t *testing.T) {
	z := &zone{Records: append(srvRecords(t), addrRecords(t)...), Extra: map[string][]dns.RR{svc: addrRecords(t)}}
	s := startServer(t, z.handle)
	r := newTestResolver(t, Config{}, testenv.NewClock(), s)

	wantSet(t, lookup(t, r, "_web._tcp.service.test"), wantWeb...)
	q := s.Queries()
	if len(q) != 1 || q[0].Type != "SRV" || q[0].Network != "udp" {
		t.Fatalf("queries = %v; want one SRV query over udp", q)
	}
	if q[0].EDNS != 4096 {
		t.Errorf("query advertises EDNS0 size %d; want 4096", q[0].EDNS)
	}
}

func TestAdditionalMissing(t *testing.T) {
	z := &zone{Records: append(srvRecords(t), addrRecords(t)...)}
	s := startServer(t, z.handle)
	r := newTestResolver(t, Config{}, testenv.NewClock(), s)

	wantSet(t, lookup(t, r, svc), wantWeb...)
	var got []string
	for _, q := range s.Queries() {
		if q.EDNS != 4096 {
			t.Errorf("query %v without EDNS0 4096", q)
		}
		got = append(got, q.Type+" "+q.Name)
	}
	slices.Sort(got)
	want := []string{"A one.node.test.", "A three.node.test.", "A two.node.test.", "AAAA one.node.test.",
		"AAAA three.node.test.", "AAAA two.node.test.", "SRV " + svc}
	if !slices.Equal(got, want) {
		t.Fatalf("queries = %v; want %v", got, want)
	}
}

func TestAdditionalOutOfOrderMixed(t *testing.T) {
	// Consul-like: glue in another order than the answers, owner names in
	// other case, TXT records interleaved; a target whose glue is absent
	// gets its own queries, the others none.
	extra := rrs(t,
		`THREE.node.test. 30 IN TXT "consul-network-segment="`,
		"Three.Node.Test. 30 IN AAAA fd00::3",
		`two.node.test. 30 IN TXT "rack=a"`,
		"TWO.node.test. 30 IN AAAA ::2",
		"two.node.test. 30 IN A 127.0.0.2",
		"unrelated.node.test. 30 IN A 127.0.0.99",
	)
	z := &zone{
		Records: append(srvRecords(t), addrRecords(t)...),
		Extra:   map[string][]dns.RR{svc: extra},
	}
	s := startServer(t, z.handle)
	r := newTestResolver(t, Config{}, testenv.NewClock(), s)

	wantSet(t, lookup(t, r, svc), wantWeb...)
	var got []string
	for _, q := range s.Queries() {
		got = append(got, q.Type+" "+q.Name)
	}
	slices.Sort(got)
	if want := []string{"A one.node.test.", "AAAA one.node.test.", "SRV " + svc}; !slices.Equal(got, want) {
		t.Fatalf("queries = %v; want %v", got, want)
	}
}

func TestSkipsPortZeroAndRootTarget(t *testing.T) {
	recs := rrs(t,
		"skip.service.test. 30 IN SRV 1 1 0 one.node.test.",
		"skip.service.test. 30 IN SRV 1 1 9000 .",
		"skip.service.test. 30 IN SRV 1 1 9001 two.node.test.",
		"none.service.test. 30 IN SRV 1 1 0 one.node.test.",
		"none.service.test. 30 IN SRV 0 0 9000 .",
	)
	z := &zone{Records: append(recs, addrRecords(t)...), Extra: map[string][]dns.RR{
		"skip.service.test.": addrRecords(t),
		"none.service.test.": addrRecords(t),
	}}
	s := startServer(t, z.handle)
	r := newTestResolver(t, Config{}, testenv.NewClock(), s)

	wantSet(t, lookup(t, r, "skip.service.test"), "127.0.0.2:9001", "[::2]:9001")
	err := lookupErr(t, r, "none.service.test")
	if !errors.Is(err, ErrNoEndpoints) || !strings.Contains(err.Error(), "none.service.test.") {
		t.Fatalf("err = %v (%s); want no endpoints naming the name", err, kindOf(err))
	}
}

func TestTargetWithoutAddress(t *testing.T) {
	recs := rrs(t,
		"part.service.test. 30 IN SRV 1 1 9001 one.node.test.",
		"part.service.test. 30 IN SRV 1 1 9002 gone.node.test.",
		"empty.service.test. 30 IN SRV 1 1 9002 gone.node.test.",
	)
	z := &zone{Records: append(recs, addrRecords(t)...)}
	s := startServer(t, z.handle)
	r := newTestResolver(t, Config{}, testenv.NewClock(), s)

	wantSet(t, lookup(t, r, "part.service.test"), "127.0.0.1:9001")
	err := lookupErr(t, r, "empty.service.test")
	if !errors.Is(err, ErrNoEndpoints) {
		t.Fatalf("err = %v (%s); want no endpoints", err, kindOf(err))
	}
}

func TestNXDOMAIN(t *testing.T) {
	z := &zone{Records: srvRecords(t)}
	s1 := startServer(t, z.handle)
	s2 := startServer(t, z.handle)
	clock := testenv.NewClock()
	r := newTestResolver(t, Config{NegativeTTL: 5 * time.Second}, clock, s1, s2)

	err := lookupErr(t, r, "nope.service.test")
	var e *Error
	if !errors.Is(err, ErrNoSuchName) || !errors.As(err, &e) {
		t.Fatalf("err = %v (%s); want *Error no such name", err, kindOf(err))
	}
	if !strings.Contains(err.Error(), "nope.service.test.") || !strings.Contains(err.Error(), s1.Addr) {
		t.Errorf("error %q does not name the name and the server", err)
	}
	if n := s2.queries.Load(); n != 0 {
		t.Errorf("second server asked %d times after NXDOMAIN; want 0 (NXDOMAIN is authoritative)", n)
	}

	// Cached for NegativeTTL, then asked again.
	clock.Advance(4 * time.Second)
	if err := lookupErr(t, r, "nope.service.test"); !errors.Is(err, ErrNoSuchName) {
		t.Fatalf("cached err = %v; want no such name", err)
	}
	if n := s1.queries.Load(); n != 1 {
		t.Fatalf("server asked %d times within NegativeTTL; want 1", n)
	}
	clock.Advance(2 * time.Second)
	_ = lookupErr(t, r, "nope.service.test")
	if n := s1.queries.Load(); n != 2 {
		t.Fatalf("server asked %d times after NegativeTTL; want 2", n)
	}
}

func TestEmptyAnswer(t *testing.T) {
	z := &zone{Records: rrs(t, `empty.service.test. 30 IN TXT "no srv here"`)}
	s := startServer(t, z.handle)
	r := newTestResolver(t, Config{}, testenv.NewClock(), s)
	err := lookupErr(t, r, "empty.service.test")
	if !errors.Is(err, ErrNoEndpoints) || !strings.Contains(err.Error(), "empty.service.test.") {
		t.Fatalf("err = %v (%s); want no endpoints naming the name", err, kindOf(err))
	}
}

func TestFailoverToSecondServer(t *testing.T) {
	z := &zone{Records: append(srvRecords(t), addrRecords(t)...), Extra: map[string][]dns.RR{svc: addrRecords(t)}}
	for _, tc := range []struct {
		name  string
		first handleFunc
	}{
		{"servfail", rcodeHandler(dns.RcodeServerFailure)},
		{"refused", rcodeHandler(dns.RcodeRefused)},
		{"notimp", rcodeHandler(dns.RcodeNotImplemented)},
		{"wrong question", func(req *dns.Msg, _ string) *dns.Msg {
			m := new(dns.Msg)
			m.SetReply(req)
			m.Question[0].Name = "other.test."
			return m
		}},
		{"timeout", func(*dns.Msg, string) *dns.Msg { return nil }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bad := startServer(t, tc.first)
			good := startServer(t, z.handle)
			r := newTestResolver(t, Config{Timeout: 200 * time.Millisecond}, testenv.NewClock(), bad, good)
			wantSet(t, lookup(t, r, svc), wantWeb...)
			if bad.queries.Load() != 1 || good.queries.Load() != 1 {
				t.Fatalf("queries: first server %d, second %d; want 1 and 1", bad.queries.Load(), good.queries.Load())
			}
			if st := r.Stats(); st.QueryErrors != 1 || st.Queries != 2 {
				t.Errorf("stats = %+v; want 2 queries, 1 error", st)
			}
		})
	}
}

func TestAllServersFail(t *testing.T) {
	for _, tc := range []struct {
		name string
		h    handleFunc
		kind error
	}{
		{"servfail", rcodeHandler(dns.RcodeServerFailure), ErrServerFailure},
		{"refused", rcodeHandler(dns.RcodeRefused), ErrRefused},
		{"timeout", func(*dns.Msg, string) *dns.Msg { return nil }, ErrTimeout},
		{"malformed", func(req *dns.Msg, _ string) *dns.Msg {
			m := new(dns.Msg)
			m.SetReply(req)
			m.Question[0].Qtype = dns.TypeA
			return m
		}, ErrMalformed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s1 := startServer(t, tc.h)
			s2 := startServer(t, tc.h)
			r := newTestResolver(t, Config{Timeout: 200 * time.Millisecond}, testenv.NewClock(), s1, s2)
			err := lookupErr(t, r, "web.service.test")
			t.Logf("error: %v", err)
			if !errors.Is(err, tc.kind) {
				t.Fatalf("err = %v (%s); want %v", err, kindOf(err), tc.kind)
			}
			for _, want := range []string{"web.service.test.", s1.Addr, s2.Addr} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not mention %s", err, want)
				}
			}
		})
	}
}

func TestServerDown(t *testing.T) {
	s := startServer(t, rcodeHandler(dns.RcodeSuccess))
	s.Stop()
	r := newTestResolver(t, Config{}, testenv.NewClock(), s)
	err := lookupErr(t, r, "web.service.test")
	// A closed UDP port answers with ICMP port unreachable: refused.
	if !errors.Is(err, ErrServerFailure) {
		t.Fatalf("err = %v (%s); want a server failure", err, kindOf(err))
	}
}

func TestTruncatedRetriesOverTCP(t *testing.T) {
	var recs []dns.RR
	for i := range 40 {
		recs = append(recs, rr(t, fmt.Sprintf("big.service.test. 0 IN SRV 1 1 %d n%d.node.test.", 9000+i, i)),
			rr(t, fmt.Sprintf("n%d.node.test. 0 IN A 127.0.1.%d", i, i)))
	}
	var want []string
	for i := range 40 {
		want = append(want, fmt.Sprintf("127.0.1.%d:%d", i, 9000+i))
	}
	z := &zone{Records: recs}
	var extra []dns.RR
	for _, r := range recs {
		if r.Header().Rrtype == dns.TypeA {
			extra = append(extra, r)
		}
	}
	z.Extra = map[string][]dns.RR{"big.service.test.": extra}
	s := startServer(t, func(req *dns.Msg, network string) *dns.Msg {
		m := z.handle(req, network)
		if network == "udp" {
			m.Truncate(512) // sets TC and drops what does not fit
		}
		return m
	})
	r := newTestResolver(t, Config{}, testenv.NewClock(), s)
	wantSet(t, lookup(t, r, "big.service.test"), want...)
	q := s.Queries()
	if len(q) != 2 || q[0].Network != "udp" || q[1].Network != "tcp" {
		t.Fatalf("queries = %v; want the SRV query over udp, then over tcp", q)
	}
	if st := r.Stats(); st.Truncated != 1 {
		t.Errorf("Stats().Truncated = %d; want 1", st.Truncated)
	}
}

func TestEDNSLargeAnswerOverUDP(t *testing.T) {
	// Like Consul: without EDNS0 only 3 instances and no TC bit.
	var recs []dns.RR
	for i := range 12 {
		recs = append(recs, rr(t, fmt.Sprintf("redis.service.consul. 0 IN SRV 1 1 %d %08x.addr.dc1.consul.", 6379, 0x7f000001+i)),
			rr(t, fmt.Sprintf("%08x.addr.dc1.consul. 0 IN A 127.0.0.%d", 0x7f000001+i, 1+i)))
	}
	z := &zone{Records: recs}
	s := startServer(t, func(req *dns.Msg, network string) *dns.Msg {
		m := z.handle(req, network)
		if req.IsEdns0() == nil && len(m.Answer) > 3 {
			m.Answer = m.Answer[:3]
		}
		return m
	})
	r := newTestResolver(t, Config{}, testenv.NewClock(), s)
	if eps := lookup(t, r, "redis.service.consul"); len(eps) != 12 {
		t.Fatalf("got %d endpoints; want 12: %v", len(eps), eps)
	}
}

// ttlZone serves SRV records whose answers expire at 30s (a), 10s (b,
// through its glue), 0 (zero) and a day (day), to check TTL clamping.
func ttlZone(t *testing.T) *zone {
	t.Helper()
	oneA := rr(t, "one.node.test. 60 IN A 127.0.0.1")
	tenA := rr(t, "ten.node.test. 10 IN A 127.0.0.10") // glue TTL below the SRV's
	dayA := rr(t, "day.node.test. 86400 IN A 127.0.0.1")
	z := &zone{
		Records: append(rrs(t,
			"a.service.test. 30 IN SRV 1 1 80 one.node.test.",
			"b.service.test. 30 IN SRV 1 1 80 ten.node.test.",
			"zero.service.test. 0 IN SRV 1 1 80 one.node.test.",
			"day.service.test. 86400 IN SRV 1 1 80 day.node.test.",
		), oneA, tenA, dayA),
		Extra: map[string][]dns.RR{
			"a.service.test.":    {oneA},
			"b.service.test.":    {tenA},
			"zero.service.test.": {oneA},
			"day.service.test.":  {dayA},
		},
	}
	return z
}

func TestTTL(t *testing.T) {
	z := ttlZone(t)
	for _, tc := range []struct {
		name      string
		fresh     time.Duration // still cached after this long
		refreshed time.Duration // queried again after this long
	}{
		{"a.service.test", 29 * time.Second, 31 * time.Second},
		{"b.service.test", 9 * time.Second, 11 * time.Second},
		{"zero.service.test", 900 * time.Millisecond, 1100 * time.Millisecond}, // MinTTL 1s
		{"day.service.test", 299 * time.Second, 301 * time.Second},             // MaxTTL 5m
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := startServer(t, z.handle)
			clock := testenv.NewClock()
			r := newTestResolver(t, Config{}, clock, s)
			lookup(t, r, tc.name)
			clock.Advance(tc.fresh)
			lookup(t, r, tc.name)
			if n := s.queries.Load(); n != 1 {
				t.Fatalf("%d queries after %v; want 1 (cached)", n, tc.fresh)
			}
			clock.Advance(tc.refreshed - tc.fresh)
			lookup(t, r, tc.name)
			if n := s.queries.Load(); n != 2 {
				t.Fatalf("%d queries after %v; want 2 (expired)", n, tc.refreshed)
			}
			if st := r.Stats(); st.CacheHits != 1 || st.CacheMisses != 2 {
				t.Errorf("stats = %+v; want 1 hit, 2 misses", st)
			}
		})
	}
}

func TestStale(t *testing.T) {
	z := &zone{Records: append(srvRecords(t), addrRecords(t)...), Extra: map[string][]dns.RR{svc: addrRecords(t)}}
	s := startServer(t, z.handle)
	clock := testenv.NewClock()
	var logs testenv.SyncBuffer
	r := newTestResolver(t, Config{StaleFor: time.Minute, Logger: testenv.Logger(t, &logs)}, clock, s)
	lookup(t, r, svc)
	s.Stop()

	// Expired, servers down: the old answer, logged once however many
	// connections and retries there are.
	clock.Advance(31 * time.Second)
	for range 5 {
		for range 10 {
			wantSet(t, lookup(t, r, svc), wantWeb...)
		}
		clock.Advance(2 * time.Second) // past the retry interval (MinTTL)
	}
	if n := logs.Count("serving stale answer"); n != 1 {
		t.Errorf("stale answer logged %d times; want once:\n%s", n, logs.String())
	}
	st := r.Stats()
	if st.StaleServed != 50 {
		t.Errorf("Stats().StaleServed = %d; want 50", st.StaleServed)
	}
	if st.Queries > 10 {
		t.Errorf("%d queries while serving stale for 10s; want about one per MinTTL", st.Queries)
	}

	// StaleFor after expiry: an error.
	clock.Advance(time.Minute)
	if err := lookupErr(t, r, svc); !errors.Is(err, ErrServerFailure) {
		t.Fatalf("err = %v (%s); want a server failure", err, kindOf(err))
	}
}

func TestStaleDisabled(t *testing.T) {
	z := &zone{Records: append(srvRecords(t), addrRecords(t)...), Extra: map[string][]dns.RR{svc: addrRecords(t)}}
	s := startServer(t, z.handle)
	clock := testenv.NewClock()
	r := newTestResolver(t, Config{StaleFor: -1}, clock, s)
	lookup(t, r, svc)
	s.Stop()
	clock.Advance(31 * time.Second)
	if err := lookupErr(t, r, svc); !errors.Is(err, ErrServerFailure) {
		t.Fatalf("err = %v (%s); want a server failure", err, kindOf(err))
	}
}

func TestStaleRecovers(t *testing.T) {
	z := &zone{Records: append(srvRecords(t), addrRecords(t)...), Extra: map[string][]dns.RR{svc: addrRecords(t)}}
	s := startServer(t, z.handle)
	clock := testenv.NewClock()
	var logs testenv.SyncBuffer
	r := newTestResolver(t, Config{Logger: testenv.Logger(t, &logs)}, clock, s)
	lookup(t, r, svc)
	s.setHandler(rcodeHandler(dns.RcodeServerFailure))
	clock.Advance(31 * time.Second)
	lookup(t, r, svc)
	s.setHandler(z.handle)
	clock.Advance(2 * time.Second)
	lookup(t, r, svc)
	if n := logs.Count("dns answering again"); n != 1 {
		t.Errorf("recovery logged %d times; want once:\n%s", n, logs.String())
	}
	// A second outage is logged again.
	s.setHandler(rcodeHandler(dns.RcodeServerFailure))
	clock.Advance(31 * time.Second)
	lookup(t, r, svc)
	if n := logs.Count("serving stale answer"); n != 2 {
		t.Errorf("stale answer logged %d times over two outages; want twice:\n%s", n, logs.String())
	}
}

func TestConcurrentCallersShareOneQuery(t *testing.T) {
	z := &zone{Records: append(srvRecords(t), addrRecords(t)...), Extra: map[string][]dns.RR{svc: addrRecords(t)}}
	release := make(chan struct{})
	s := startServer(t, func(req *dns.Msg, network string) *dns.Msg {
		<-release
		return z.handle(req, network)
	})
	r := newTestResolver(t, Config{Timeout: 30 * time.Second}, testenv.NewClock(), s)

	const callers = 50
	wait := lookupsAtOnce(r, svc, callers, len(wantWeb))
	// Release the reply once every caller is either querying or waiting.
	deadline := time.Now().Add(30 * time.Second)
	for st := r.Stats(); st.CacheMisses+st.Shared < callers; st = r.Stats() {
		if time.Now().After(deadline) {
			close(release)
			t.Fatalf("callers never all waited: %+v", st)
		}
		time.Sleep(time.Millisecond)
	}
	close(release)
	if err := wait(); err != nil {
		t.Error(err)
	}
	if n := s.queries.Load(); n != 1 {
		t.Fatalf("%d upstream queries for %d concurrent callers; want 1", n, callers)
	}
	if st := r.Stats(); st.CacheMisses != 1 || st.Shared != callers-1 {
		t.Errorf("stats = %+v; want 1 miss and %d shared", st, callers-1)
	}
}

func TestCanceledCallerDoesNotFailOthers(t *testing.T) {
	z := &zone{Records: append(srvRecords(t), addrRecords(t)...), Extra: map[string][]dns.RR{svc: addrRecords(t)}}
	release := make(chan struct{})
	first := true
	var mu sync.Mutex
	s := startServer(t, func(req *dns.Msg, network string) *dns.Msg {
		mu.Lock()
		wait := first
		first = false
		mu.Unlock()
		if wait {
			<-release // the first caller's query hangs until it gives up
			return nil
		}
		return z.handle(req, network)
	})
	t.Cleanup(func() { close(release) })
	r := newTestResolver(t, Config{Timeout: 30 * time.Second}, testenv.NewClock(), s)

	ctx, cancel := context.WithCancel(context.Background())
	leaderDone := make(chan error, 1)
	go func() {
		_, err := r.Lookup(ctx, svc)
		leaderDone <- err
	}()
	for s.queries.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	followerDone := make(chan error, 1)
	go func() {
		_, err := r.Lookup(context.Background(), svc)
		followerDone <- err
	}()
	for r.Stats().Shared == 0 {
		time.Sleep(time.Millisecond)
	}
	cancel()
	if err := <-leaderDone; !errors.Is(err, context.Canceled) {
		t.Errorf("canceled caller: err = %v; want context.Canceled", err)
	}
	if err := <-followerDone; err != nil {
		t.Errorf("waiting caller: err = %v; want it to query for itself", err)
	}
}

func TestHostPort(t *testing.T) {
	z := &zone{Records: rrs(t,
		"db.node.test. 30 IN A 127.0.0.5",
		"db.node.test. 30 IN A 127.0.0.6",
		"db.node.test. 30 IN AAAA ::5",
		"alias.node.test. 30 IN CNAME db.node.test.",
		"v6only.node.test. 30 IN AAAA fd00::7",
		`txt.node.test. 30 IN TXT "x"`,
	)}
	// The CNAME answer carries the target's records as a recursive server would.
	s := startServer(t, func(req *dns.Msg, network string) *dns.Msg {
		m := z.handle(req, network)
		if strings.HasPrefix(req.Question[0].Name, "alias.") {
			for _, rr := range z.Records {
				if rr.Header().Name == "db.node.test." && rr.Header().Rrtype == req.Question[0].Qtype {
					m.Answer = append(m.Answer, rr)
				}
			}
		}
		return m
	})
	r := newTestResolver(t, Config{}, testenv.NewClock(), s)

	wantSet(t, lookup(t, r, "db.node.test:5432"), "127.0.0.5:5432", "127.0.0.6:5432", "[::5]:5432")
	wantSet(t, lookup(t, r, "alias.node.test:5432"), "127.0.0.5:5432", "127.0.0.6:5432", "[::5]:5432")
	wantSet(t, lookup(t, r, "v6only.node.test.:80"), "[fd00::7]:80")
	if err := lookupErr(t, r, "missing.node.test:80"); !errors.Is(err, ErrNoSuchName) {
		t.Errorf("missing host: err = %v (%s); want no such name", err, kindOf(err))
	}
	if err := lookupErr(t, r, "txt.node.test:80"); !errors.Is(err, ErrNoEndpoints) || !strings.Contains(err.Error(), "txt.node.test.") {
		t.Errorf("host without addresses: err = %v (%s); want no endpoints naming it", err, kindOf(err))
	}
}

func TestAddrPort(t *testing.T) {
	s := startServer(t, rcodeHandler(dns.RcodeServerFailure))
	r := newTestResolver(t, Config{}, testenv.NewClock(), s)
	wantSet(t, lookup(t, r, "10.1.2.3:6379"), "10.1.2.3:6379")
	wantSet(t, lookup(t, r, "[fd00::1]:6379"), "[fd00::1]:6379")
	if n := s.queries.Load(); n != 0 {
		t.Fatalf("%d DNS queries for ip:port; want 0", n)
	}
}

func TestLookupInvalidValue(t *testing.T) {
	s := startServer(t, rcodeHandler(dns.RcodeServerFailure))
	r := newTestResolver(t, Config{}, testenv.NewClock(), s)
	err := lookupErr(t, r, "bad..name")
	if !errors.Is(err, ErrInvalidValue) || !strings.Contains(err.Error(), `"bad..name"`) {
		t.Fatalf("err = %v; want invalid value naming it", err)
	}
	if n := s.queries.Load(); n != 0 {
		t.Fatalf("%d DNS queries for an invalid value; want 0", n)
	}
}

func TestPriorityWeightDistribution(t *testing.T) {
	// Priority 10: weights 60/30/10 and one 0; priority 20: 5/5.
	// Priority 30: all weight 0, which is a uniform order.
	z := &zone{Records: rrs(t,
		"w.service.test. 30 IN SRV 10 60 1 n.node.test.",
		"w.service.test. 30 IN SRV 10 30 2 n.node.test.",
		"w.service.test. 30 IN SRV 10 10 3 n.node.test.",
		"w.service.test. 30 IN SRV 10 0 4 n.node.test.",
		"w.service.test. 30 IN SRV 20 5 5 n.node.test.",
		"w.service.test. 30 IN SRV 20 5 6 n.node.test.",
		"w.service.test. 30 IN SRV 30 0 7 n.node.test.",
		"w.service.test. 30 IN SRV 30 0 8 n.node.test.",
		"w.service.test. 30 IN SRV 30 0 9 n.node.test.",
		"w.service.test. 30 IN SRV 30 0 10 n.node.test.",
		"n.node.test. 30 IN A 127.0.0.1",
	), Extra: map[string][]dns.RR{"w.service.test.": rrs(t, "n.node.test. 30 IN A 127.0.0.1")}}
	s := startServer(t, z.handle)
	r := newTestResolver(t, Config{}, testenv.NewClock(), s)

	const calls = 20000
	var pos [4][11]int // pos[i][port]: how often port came at index i of its group
	for range calls {
		eps := lookup(t, r, "w.service.test")
		ports := make([]int, len(eps))
		for i, ep := range eps {
			ports[i] = int(ep.Port())
		}
		// Groups in priority order, weight 0 after the weighted ones.
		if g := slices.Sorted(slices.Values(ports[:3])); !slices.Equal(g, []int{1, 2, 3}) || ports[3] != 4 {
			t.Fatalf("priority 10 group = %v; want a permutation of 1,2,3 then 4", ports[:4])
		}
		if g := slices.Sorted(slices.Values(ports[4:6])); !slices.Equal(g, []int{5, 6}) {
			t.Fatalf("priority 20 group = %v; want 5,6 in some order", ports[4:6])
		}
		if g := slices.Sorted(slices.Values(ports[6:])); !slices.Equal(g, []int{7, 8, 9, 10}) {
			t.Fatalf("priority 30 group = %v; want 7-10 in some order", ports[6:])
		}
		pos[0][ports[0]]++
		pos[1][ports[1]]++
		pos[2][ports[4]]++
		pos[3][ports[6]]++
	}
	// Expected shares; the bound 0.03 is over 8 standard deviations at
	// 20000 calls, so this does not flake, yet a wrong algorithm (uniform,
	// or weights ignored after the first pick) misses it by far.
	for _, c := range []struct {
		what  string
		index int
		port  int
		want  float64
	}{
		{"first is weight 60", 0, 1, 0.6},
		{"first is weight 30", 0, 2, 0.3},
		{"first is weight 10", 0, 3, 0.1},
		// P(second = 60) = .3*60/70 + .1*60/90, and so on.
		{"second is weight 60", 1, 1, 0.3*60/70 + 0.1*60/90},
		{"second is weight 30", 1, 2, 0.6*30/40 + 0.1*30/90},
		{"second is weight 10", 1, 3, 0.6*10/40 + 0.3*10/70},
		{"equal weights", 2, 5, 0.5},
		{"weight 0 uniform 7", 3, 7, 0.25},
		{"weight 0 uniform 8", 3, 8, 0.25},
		{"weight 0 uniform 9", 3, 9, 0.25},
		{"weight 0 uniform 10", 3, 10, 0.25},
	} {
		got := float64(pos[c.index][c.port]) / calls
		if got < c.want-0.03 || got > c.want+0.03 {
			t.Errorf("%s: share %.3f; want %.3f ± 0.03", c.what, got, c.want)
		}
	}
	if n := s.queries.Load(); n != 1 {
		t.Errorf("%d queries for %d cached lookups; want 1", n, calls)
	}
}

func TestCachedAnswerNeverReordered(t *testing.T) {
	z := &zone{Records: rrs(t,
		"w.service.test. 30 IN SRV 10 60 1 a.node.test.",
		"w.service.test. 30 IN SRV 10 30 2 b.node.test.",
		"w.service.test. 30 IN SRV 10 0 3 c.node.test.",
		"w.service.test. 30 IN SRV 20 0 4 c.node.test.",
		"a.node.test. 30 IN A 127.0.0.1",
		"a.node.test. 30 IN A 127.0.0.2",
		"b.node.test. 30 IN A 127.0.0.3",
		"c.node.test. 30 IN AAAA ::4",
		"c.node.test. 30 IN A 127.0.0.4",
	)}
	s := startServer(t, z.handle)
	r := newTestResolver(t, Config{}, testenv.NewClock(), s)
	first := lookup(t, r, "w.service.test")
	want := sorted(first)

	e := r.cache.get("w.service.test")
	snapshot := fmt.Sprint(e.ans.Load().groups)

	// Callers scramble what they get, concurrently; -race reports any
	// sharing with the cache, and the cache must stay as it was.
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 2000 {
				eps, err := r.Lookup(context.Background(), "w.service.test")
				if err != nil {
					t.Error(err)
					return
				}
				if g := sorted(eps); !slices.Equal(g, want) {
					t.Errorf("endpoints = %v; want %v", g, want)
					return
				}
				slices.Reverse(eps)
				clear(eps)
			}
		})
	}
	wg.Wait()
	if got := fmt.Sprint(e.ans.Load().groups); got != snapshot {
		t.Fatalf("cached answer changed:\n got %s\nwant %s", got, snapshot)
	}
}

func TestNew(t *testing.T) {
	dir := t.TempDir()
	conf := filepath.Join(dir, "resolv.conf")
	if err := os.WriteFile(conf, []byte("search example.com\nnameserver 192.0.2.53\nnameserver 2001:db8::53\noptions ndots:2\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	r, err := New(Config{resolvConf: conf})
	if err != nil {
		t.Fatalf("New with resolv.conf: %v", err)
	}
	if got, want := r.Servers(), []string{"192.0.2.53:53", "[2001:db8::53]:53"}; !slices.Equal(got, want) {
		t.Errorf("Servers() = %v; want %v", got, want)
	}

	empty := filepath.Join(dir, "empty.conf")
	if err := os.WriteFile(empty, []byte("search example.com\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"no nameserver", Config{resolvConf: empty}, "no nameserver"},
		{"missing resolv.conf", Config{resolvConf: filepath.Join(dir, "nope")}, "reading dns servers"},
		{"server without port", Config{Servers: []string{"127.0.0.1"}}, `"127.0.0.1"`},
		{"server name", Config{Servers: []string{"dns.test:53"}}, `"dns.test:53"`},
		{"server port 0", Config{Servers: []string{"127.0.0.1:0"}}, `"127.0.0.1:0"`},
		{"negative timeout", Config{Servers: []string{"127.0.0.1:53"}, Timeout: -1}, "negative timeout"},
		{"min above max", Config{Servers: []string{"127.0.0.1:53"}, MinTTL: time.Hour, MaxTTL: time.Minute}, "exceeds"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(tc.cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("New(%+v) err = %v; want one containing %q", tc.cfg, err, tc.want)
			}
		})
	}
}

func TestNoGoroutinesLeft(t *testing.T) {
	testenv.CheckGoroutines(t) // registered first, so it checks after the server stopped
	z := &zone{Records: append(srvRecords(t), addrRecords(t)...)}
	s := startServer(t, z.handle)
	r := newTestResolver(t, Config{}, testenv.NewClock(), s)
	wantSet(t, lookup(t, r, svc), wantWeb...)
	wantSet(t, lookup(t, r, "one.node.test:1"), "127.0.0.1:1")
}
