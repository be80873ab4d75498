package resolver

import (
	"context"
	"errors"
	"fmt"
	"github.com/connectable/connectable/internal/testenv"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// cachedKeys returns the values in r's cache, sorted, after checking that
// the map and the clock's ring agree.
func cachedKeys(t testing.TB, r *Resolver) []string {
	t.Helper()
	c := &r.cache
	c.mu.Lock()
	defer c.mu.Unlock()
	var keys []string
	for _, e := range c.ring {
		if got := c.get(e.key); got != e {
			t.Fatalf("ring holds %q, map has %p for it, not %p", e.key, got, e)
		}
		keys = append(keys, e.key)
	}
	n := 0
	c.m.Range(func(any, any) bool { n++; return true })
	if n != len(keys) {
		t.Fatalf("map holds %d entries, ring %d", n, len(keys))
	}
	slices.Sort(keys)
	return keys
}

func TestCacheEvictsSpentFirst(t *testing.T) {
	s := startServer(t, (&zone{}).handle) // NXDOMAIN for everything
	clock := testenv.NewClock()
	r := newTestResolver(t, Config{CacheSize: 4, MaxTTL: time.Minute, StaleFor: time.Minute}, clock, s)

	// A value looked up twice, a negative answer looked up twice, and two
	// values looked up once.
	lookup(t, r, "127.0.0.1:1")
	lookup(t, r, "127.0.0.1:1")
	for range 2 {
		if err := lookupErr(t, r, "nope.service.test"); !errors.Is(err, ErrNoSuchName) {
			t.Fatalf("err = %v; want NXDOMAIN", err)
		}
	}
	lookup(t, r, "127.0.0.2:1")
	lookup(t, r, "127.0.0.3:1")

	// The negative answer expires: it goes first, although it was used.
	clock.Advance(2 * time.Second)
	lookup(t, r, "127.0.0.4:1")
	if got, want := cachedKeys(t, r), []string{"127.0.0.1:1", "127.0.0.2:1", "127.0.0.3:1", "127.0.0.4:1"}; !slices.Equal(got, want) {
		t.Fatalf("cached %v; want %v (the expired negative answer evicted)", got, want)
	}

	// Nothing is spent now: the oldest value looked up only once goes, not
	// the one looked up again.
	lookup(t, r, "127.0.0.5:1")
	if got, want := cachedKeys(t, r), []string{"127.0.0.1:1", "127.0.0.3:1", "127.0.0.4:1", "127.0.0.5:1"}; !slices.Equal(got, want) {
		t.Fatalf("cached %v; want %v (127.0.0.2:1, used once, evicted)", got, want)
	}

	// Past MaxTTL and StaleFor every entry is spent, however often used.
	lookup(t, r, "127.0.0.1:1")
	clock.Advance(3 * time.Minute)
	lookup(t, r, "127.0.0.6:1")
	if got, want := cachedKeys(t, r), []string{"127.0.0.6:1"}; !slices.Equal(got, want) {
		t.Fatalf("cached %v; want %v (all the others spent)", got, want)
	}
	if st := r.Stats(); st.Evictions != 6 || st.Entries != 1 {
		t.Errorf("Stats() evictions %d, entries %d; want 6, 1", st.Evictions, st.Entries)
	}
	// An evicted value still works.
	wantSet(t, lookup(t, r, "127.0.0.2:1"), "127.0.0.2:1")
}

// TestCacheBounded looks up every one of 65,535 distinct values (ip:port
// needs no DNS, so this is the cache alone) while a service in use is
// looked up every 100 values: the cache never exceeds its size, and the
// service in use is never evicted, so its server sees one query.
func TestCacheBounded(t *testing.T) {
	z := &zone{Records: append(srvRecords(t), addrRecords(t)...), Extra: map[string][]dns.RR{svc: addrRecords(t)}}
	s := startServer(t, z.handle)
	const size = 1000
	r := newTestResolver(t, Config{CacheSize: size, MinTTL: time.Hour, MaxTTL: time.Hour}, testenv.NewClock(), s)
	ctx := context.Background()
	wantSet(t, lookup(t, r, svc), wantWeb...)
	queries := s.queries.Load()
	for p := 1; p <= 65535; p++ {
		value := fmt.Sprintf("127.0.0.1:%d", p)
		eps, err := r.Lookup(ctx, value)
		if err != nil || len(eps) != 1 || eps[0].Port() != uint16(p) {
			t.Fatalf("Lookup(%q) = %v, %v", value, eps, err)
		}
		if p%100 == 0 {
			if eps, err := r.Lookup(ctx, svc); err != nil || len(eps) != len(wantWeb) {
				t.Fatalf("Lookup(%q) = %v, %v", svc, eps, err)
			}
		}
		if p%1000 == 0 {
			if n := r.Stats().Entries; n > size {
				t.Fatalf("%d entries after %d values; want at most %d", n, p, size)
			}
		}
	}
	keys := cachedKeys(t, r)
	if len(keys) != size {
		t.Errorf("%d entries; want %d", len(keys), size)
	}
	if !slices.Contains(keys, svc) {
		t.Errorf("the service in use was evicted")
	}
	if n := s.queries.Load() - queries; n != 0 {
		t.Errorf("%d more queries for the service in use; want 0 (never evicted)", n)
	}
	if st := r.Stats(); st.Evictions != 65535+1-size {
		t.Errorf("Stats().Evictions = %d; want %d", st.Evictions, 65535+1-size)
	}
}

// TestFailureCached sends 1,000 concurrent lookups of one name to a server
// that fails (SERVFAIL, REFUSED, no answer at all), then 1,000 more once
// the first have their error: each lookup fails with the server's error,
// and the server sees one query, not one per lookup. Once the failure has
// expired (NegativeTTL), the next lookup asks again.
func TestFailureCached(t *testing.T) {
	for _, tc := range []struct {
		name string
		h    handleFunc
		kind error
	}{
		{"servfail", rcodeHandler(dns.RcodeServerFailure), ErrServerFailure},
		{"refused", rcodeHandler(dns.RcodeRefused), ErrRefused},
		{"timeout", func(*dns.Msg, string) *dns.Msg { return nil }, ErrTimeout},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := startServer(t, tc.h)
			clock := testenv.NewClock()
			r := newTestResolver(t, Config{Timeout: 200 * time.Millisecond}, clock, s)
			const clients = 1000
			for wave := range 2 {
				start := make(chan struct{})
				errs := make(chan error, clients)
				var wg sync.WaitGroup
				for range clients {
					wg.Go(func() {
						<-start
						ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
						defer cancel()
						eps, err := r.Lookup(ctx, svc)
						if err == nil {
							err = fmt.Errorf("got %v", eps)
						} else if !errors.Is(err, tc.kind) {
							err = fmt.Errorf("err = %w (%s); want %v", err, kindOf(err), tc.kind)
						} else {
							err = nil
						}
						errs <- err
					})
				}
				close(start)
				wg.Wait()
				close(errs)
				for err := range errs {
					if err != nil {
						t.Fatalf("wave %d: %v", wave, err)
					}
				}
				if n := s.queries.Load(); n != 1 {
					t.Fatalf("after wave %d of %d concurrent lookups: %d queries at the server; want 1", wave, clients, n)
				}
			}
			clock.Advance(DefaultNegativeTTL)
			if err := lookupErr(t, r, svc); !errors.Is(err, tc.kind) {
				t.Fatalf("err = %v (%s); want %v", err, kindOf(err), tc.kind)
			}
			if n := s.queries.Load(); n != 2 {
				t.Fatalf("%d queries at the server once the failure expired; want 2", n)
			}
		})
	}
}

// TestStaleUnderLoad checks that failure caching leaves stale answers as
// they were: during an outage, 1,000 concurrent lookups all get the old
// answer, and the failing server sees a query per MinTTL, not per lookup.
func TestStaleUnderLoad(t *testing.T) {
	z := &zone{Records: append(srvRecords(t), addrRecords(t)...), Extra: map[string][]dns.RR{svc: addrRecords(t)}}
	s := startServer(t, z.handle)
	clock := testenv.NewClock()
	r := newTestResolver(t, Config{StaleFor: time.Minute}, clock, s)
	wantSet(t, lookup(t, r, svc), wantWeb...)
	s.setHandler(rcodeHandler(dns.RcodeServerFailure))
	clock.Advance(31 * time.Second) // past the TTL of 30s

	const clients = 1000
	if err := lookupsAtOnce(r, svc, clients, len(wantWeb))(); err != nil {
		t.Fatal(err)
	}
	if n := s.queries.Load(); n != 2 {
		t.Errorf("%d queries at the server; want 2 (the answer, then one failed refresh)", n)
	}
	if st := r.Stats(); st.StaleServed != clients {
		t.Errorf("Stats().StaleServed = %d; want %d", st.StaleServed, clients)
	}
	// Past StaleFor: the failure, itself cached.
	clock.Advance(2 * time.Minute)
	for range 10 {
		if err := lookupErr(t, r, svc); !errors.Is(err, ErrServerFailure) {
			t.Fatalf("err = %v (%s); want a server failure", err, kindOf(err))
		}
	}
	if n := s.queries.Load(); n != 3 {
		t.Errorf("%d queries at the server; want 3", n)
	}
}
