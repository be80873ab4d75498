package resolver

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
	"github.com/miekg/dns"
)

func answerOf(t testing.TB, r *Resolver, value string) Answer {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	a, err := r.Answer(ctx, value)
	if err != nil {
		t.Fatalf("Answer(%q): %v", value, err)
	}
	return a
}

// layout renders an answer's groups as "prio: weight[eps] weight[eps]; ...",
// endpoints sorted inside a target (their order there is not part of the
// contract), so one string comparison checks the whole structure.
func layout(a Answer) string {
	var b strings.Builder
	for i, g := range a.Groups {
		if i > 0 {
			b.WriteString("; ")
		}
		fmt.Fprintf(&b, "%d:", g.Priority)
		for _, t := range g.Targets {
			fmt.Fprintf(&b, " %d%v", t.Weight, sorted(t.Endpoints))
		}
	}
	return b.String()
}

func TestAnswerPrioritiesAndWeights(t *testing.T) {
	name := "w.service.test."
	glue := rrs(t,
		"a.node.test. 30 IN A 127.0.0.1",
		"b.node.test. 30 IN A 127.0.0.2",
		"b.node.test. 30 IN AAAA fd00::2",
		"c.node.test. 30 IN A 127.0.0.3",
		"d.node.test. 30 IN A 127.0.0.4",
	)
	// Out of order on purpose: groups come back sorted by priority, weight
	// 0 after the weighted targets of its group.
	z := &zone{Records: append(rrs(t,
		name+" 30 IN SRV 20 5 2001 d.node.test.",
		name+" 30 IN SRV 10 0 1000 c.node.test.",
		name+" 30 IN SRV 10 60 1060 a.node.test.",
		name+" 30 IN SRV 10 30 1030 b.node.test.",
		name+" 30 IN SRV 30 0 3000 a.node.test.",
	), glue...), Extra: map[string][]dns.RR{name: glue}}
	s := startServer(t, z.handle)
	r := newTestResolver(t, Config{}, testenv.NewClock(), s)

	a := answerOf(t, r, "w.service.test")
	want := "10: 60[127.0.0.1:1060] 30[127.0.0.2:1030 [fd00::2]:1030] 0[127.0.0.3:1000]; " +
		"20: 5[127.0.0.4:2001]; " +
		"30: 0[127.0.0.1:3000]"
	if got := layout(a); got != want {
		t.Errorf("answer = %s; want %s", got, want)
	}
	if a.Stale {
		t.Errorf("fresh answer has Stale set")
	}
}

func TestAnswerHostPortAndAddrPort(t *testing.T) {
	z := &zone{Records: rrs(t,
		"db.node.test. 30 IN A 127.0.0.5",
		"db.node.test. 30 IN A 127.0.0.6",
		"db.node.test. 30 IN AAAA ::5",
	)}
	s := startServer(t, z.handle)
	clock := testenv.NewClock()
	r := newTestResolver(t, Config{}, clock, s)

	// Each address its own target of weight 1, in the order of its
	// records, so the layout is exact.
	a := answerOf(t, r, "db.node.test:5432")
	if got, want := layout(a), "0: 1[127.0.0.5:5432] 1[127.0.0.6:5432] 1[[::5]:5432]"; got != want {
		t.Errorf("host:port answer = %s; want %s", got, want)
	}
	queries := s.queries.Load()
	for _, tc := range []struct{ value, want string }{
		{"10.1.2.3:6379", "0: 1[10.1.2.3:6379]"},
		{"[fd00::1]:6379", "0: 1[[fd00::1]:6379]"},
	} {
		a := answerOf(t, r, tc.value)
		if got := layout(a); got != tc.want {
			t.Errorf("%s: answer = %s; want %s", tc.value, got, tc.want)
		}
		// ip:port needs no DNS and lives as long as the ceiling allows.
		if want := clock.Now().Add(DefaultMaxTTL); !a.Expires.Equal(want) {
			t.Errorf("%s: expires %v; want %v (MaxTTL)", tc.value, a.Expires, want)
		}
	}
	if n := s.queries.Load(); n != queries {
		t.Errorf("%d DNS queries for ip:port values; want 0", n-queries)
	}
}

func TestAnswerExpiresFollowsClampedTTL(t *testing.T) {
	z := ttlZone(t)
	s := startServer(t, z.handle)
	for _, tc := range []struct {
		name string
		ttl  time.Duration
	}{
		{"a.service.test", 30 * time.Second},
		{"b.service.test", 10 * time.Second}, // the glue's TTL, below the SRV's
		{"zero.service.test", 3 * time.Second},
		{"day.service.test", time.Minute},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clock := testenv.NewClock()
			// Floor and ceiling other than the defaults, so the test
			// sees the configured clamp rather than constants.
			r := newTestResolver(t, Config{MinTTL: 3 * time.Second, MaxTTL: time.Minute}, clock, s)
			clock.Advance(time.Hour) // Expires is relative to the clock, not to its start
			start := clock.Now()
			a := answerOf(t, r, tc.name)
			if want := start.Add(tc.ttl); !a.Expires.Equal(want) {
				t.Fatalf("expires %v after the lookup; want %v", a.Expires.Sub(start), tc.ttl)
			}
			// Still the same answer until then; a new one afterwards.
			clock.Advance(tc.ttl - time.Millisecond)
			if b := answerOf(t, r, tc.name); !b.Expires.Equal(a.Expires) {
				t.Errorf("before expiry: expires %v; want the cached %v", b.Expires, a.Expires)
			}
			clock.Advance(2 * time.Millisecond)
			if b := answerOf(t, r, tc.name); !b.Expires.Equal(clock.Now().Add(tc.ttl)) {
				t.Errorf("after expiry: expires %v after now; want %v", b.Expires.Sub(clock.Now()), tc.ttl)
			}
		})
	}
}

func TestAnswerCachedCostsNoQuery(t *testing.T) {
	z := &zone{Records: append(srvRecords(t), addrRecords(t)...), Extra: map[string][]dns.RR{svc: addrRecords(t)}}
	s := startServer(t, z.handle)
	clock := testenv.NewClock()
	r := newTestResolver(t, Config{}, clock, s)

	first := answerOf(t, r, svc)
	clock.Advance(29 * time.Second)
	for range 100 {
		if a := answerOf(t, r, svc); layout(a) != layout(first) {
			t.Fatalf("cached answer = %s; want %s", layout(a), layout(first))
		}
	}
	// Lookup and Answer share one cache entry.
	wantSet(t, lookup(t, r, svc), wantWeb...)
	if n := s.queries.Load(); n != 1 {
		t.Errorf("%d queries; want 1", n)
	}
	if st := r.Stats(); st.CacheMisses != 1 || st.CacheHits != 101 {
		t.Errorf("stats = %+v; want 1 miss and 101 hits", st)
	}
}

func TestAnswerConcurrentCallersShareOneQuery(t *testing.T) {
	z := &zone{Records: append(srvRecords(t), addrRecords(t)...), Extra: map[string][]dns.RR{svc: addrRecords(t)}}
	release := make(chan struct{})
	s := startServer(t, func(req *dns.Msg, network string) *dns.Msg {
		<-release
		return z.handle(req, network)
	})
	r := newTestResolver(t, Config{Timeout: 30 * time.Second}, testenv.NewClock(), s)

	const callers = 20
	errs := make(chan error, callers)
	for range callers {
		go func() {
			a, err := r.Answer(context.Background(), svc)
			if err == nil && len(a.Groups) != 1 {
				err = fmt.Errorf("got %s", layout(a))
			}
			errs <- err
		}()
	}
	deadline := time.Now().Add(30 * time.Second)
	for st := r.Stats(); st.CacheMisses+st.Shared < callers; st = r.Stats() {
		if time.Now().After(deadline) {
			close(release)
			t.Fatalf("callers never all waited: %+v", st)
		}
		time.Sleep(time.Millisecond)
	}
	close(release)
	for range callers {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	if n := s.queries.Load(); n != 1 {
		t.Errorf("%d upstream queries for %d concurrent callers; want 1", n, callers)
	}
}

func TestAnswerIsACopy(t *testing.T) {
	z := &zone{Records: append(srvRecords(t), addrRecords(t)...), Extra: map[string][]dns.RR{svc: addrRecords(t)}}
	s := startServer(t, z.handle)
	r := newTestResolver(t, Config{}, testenv.NewClock(), s)

	a := answerOf(t, r, svc)
	want := layout(a)
	bogus := netip.MustParseAddrPort("192.0.2.1:1")
	for gi := range a.Groups {
		g := &a.Groups[gi]
		for ti := range g.Targets {
			tg := &g.Targets[ti]
			for i := range tg.Endpoints {
				tg.Endpoints[i] = bogus
			}
			// An append must not spill into the next target's endpoints.
			tg.Endpoints = append(tg.Endpoints, bogus)
			tg.Weight = 999
		}
		g.Priority = 999
	}
	if got := layout(answerOf(t, r, svc)); got != want {
		t.Errorf("after modifying a returned answer: %s; want %s", got, want)
	}
	wantSet(t, lookup(t, r, svc), wantWeb...)

	b, c := answerOf(t, r, svc), answerOf(t, r, svc)
	b.Groups[0].Targets[0].Endpoints = append(b.Groups[0].Targets[0].Endpoints, bogus)
	if len(b.Groups[0].Targets) > 1 && slices.Contains(b.Groups[0].Targets[1].Endpoints, bogus) {
		t.Errorf("append to one target's endpoints changed the next target's")
	}
	if got := layout(c); got != want {
		t.Errorf("another caller's answer changed: %s; want %s", got, want)
	}
}

func TestAnswerErrorsMatchLookup(t *testing.T) {
	z := &zone{Records: rrs(t, `empty.service.test. 30 IN TXT "x"`)}
	s := startServer(t, z.handle)
	r := newTestResolver(t, Config{}, testenv.NewClock(), s)

	for _, tc := range []struct {
		value string
		kind  error
	}{
		{"missing.service.test", ErrNoSuchName},
		{"empty.service.test", ErrNoEndpoints},
		{"bad..name", ErrInvalidValue},
		{"10.0.0.1", ErrInvalidValue},
	} {
		t.Run(tc.value, func(t *testing.T) {
			ctx := context.Background()
			a, aerr := r.Answer(ctx, tc.value)
			if aerr == nil {
				t.Fatalf("Answer(%q) = %s; want an error", tc.value, layout(a))
			}
			if !errors.Is(aerr, tc.kind) {
				t.Errorf("Answer error %v (%s); want %v", aerr, kindOf(aerr), tc.kind)
			}
			if len(a.Groups) != 0 {
				t.Errorf("Answer with an error has groups: %s", layout(a))
			}
			lerr := lookupErr(t, r, tc.value)
			if lerr.Error() != aerr.Error() || kindOf(lerr) != kindOf(aerr) {
				t.Errorf("Lookup error %q (%s); Answer error %q (%s); want the same", lerr, kindOf(lerr), aerr, kindOf(aerr))
			}
		})
	}
	// A negative answer is cached for both: one query per name, not one per call.
	if n := s.queries.Load(); n != 2 {
		t.Errorf("%d queries for two names looked up twice each; want 2", n)
	}
}

func TestAnswerStale(t *testing.T) {
	z := &zone{Records: append(srvRecords(t), addrRecords(t)...), Extra: map[string][]dns.RR{svc: addrRecords(t)}}
	s := startServer(t, z.handle)
	clock := testenv.NewClock()
	r := newTestResolver(t, Config{MinTTL: 2 * time.Second, StaleFor: time.Minute}, clock, s)
	fresh := answerOf(t, r, svc)
	s.setHandler(rcodeHandler(dns.RcodeServerFailure))

	clock.Advance(31 * time.Second)
	a := answerOf(t, r, svc)
	if !a.Stale {
		t.Fatalf("answer with every server failing is not stale")
	}
	if got, want := layout(a), layout(fresh); got != want {
		t.Errorf("stale answer = %s; want the old %s", got, want)
	}
	// Soon enough that the caller asks again at Lookup's retry rate, and
	// not in the past, which would have it spin.
	if want := clock.Now().Add(2 * time.Second); !a.Expires.Equal(want) {
		t.Errorf("stale answer expires %v after now; want MinTTL (2s)", a.Expires.Sub(clock.Now()))
	}
	queries := s.queries.Load()
	clock.Advance(time.Second)
	if b := answerOf(t, r, svc); !b.Stale || !b.Expires.Equal(a.Expires) {
		t.Errorf("within MinTTL: stale %v expires %v; want the cached stale answer expiring %v", b.Stale, b.Expires, a.Expires)
	}
	if n := s.queries.Load(); n != queries {
		t.Errorf("%d queries within MinTTL of a stale answer; want 0", n-queries)
	}

	s.setHandler(z.handle)
	clock.Advance(2 * time.Second)
	if b := answerOf(t, r, svc); b.Stale || !b.Expires.Equal(clock.Now().Add(30*time.Second)) {
		t.Errorf("after recovery: stale %v, expires %v after now; want fresh, 30s", b.Stale, b.Expires.Sub(clock.Now()))
	}
}

// TestAnswerExportExpiry covers the case the fake clock cannot reach
// through a server: an answer handed out after its expiry (a stale one
// while a refresh is in flight) gets an Expires ahead of now.
func TestAnswerExportExpiry(t *testing.T) {
	now := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	a := newAnswer([]srvRecord{{priority: 1, weight: 2, endpoints: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:80")}}})
	a.stale = true
	a.expires = now.Add(-time.Second)
	got := a.export(now, 3*time.Second)
	if !got.Expires.Equal(now.Add(3 * time.Second)) {
		t.Errorf("expires %v after now; want 3s", got.Expires.Sub(now))
	}
	if layout(got) != "1: 2[127.0.0.1:80]" || !got.Stale {
		t.Errorf("export = %s stale=%v; want 1: 2[127.0.0.1:80] stale", layout(got), got.Stale)
	}
}
