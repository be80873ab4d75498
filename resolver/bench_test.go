package resolver

import (
	"context"
	"fmt"
	"github.com/connectable/connectable/internal/testenv"
	"runtime"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// consulZone answers name with n SRV records of equal priority and weight,
// as Consul does, with their A records in the additional section and TXT
// records in between.
func consulZone(tb testing.TB, name string, n int) *zone {
	z := &zone{Extra: map[string][]dns.RR{}}
	for i := range n {
		target := fmt.Sprintf("7f0001%02x.addr.dc1.consul.", i)
		a := rr(tb, fmt.Sprintf("%s 0 IN A 127.0.1.%d", target, i))
		z.Records = append(z.Records, rr(tb, fmt.Sprintf("%s 0 IN SRV 1 1 %d %s", name, 20000+i, target)), a)
		z.Extra[name] = append(z.Extra[name], a, rr(tb, fmt.Sprintf(`%s 0 IN TXT "consul-network-segment="`, target)))
	}
	return z
}

// weightedZone answers name with two priority groups of mixed weights.
func weightedZone(tb testing.TB, name string) *zone {
	z := &zone{Extra: map[string][]dns.RR{}}
	for i, pw := range [][2]int{{10, 60}, {10, 30}, {10, 10}, {10, 0}, {20, 5}, {20, 5}} {
		target := fmt.Sprintf("n%d.node.test.", i)
		a := rr(tb, fmt.Sprintf("%s 30 IN A 127.0.1.%d", target, i))
		z.Records = append(z.Records, rr(tb, fmt.Sprintf("%s 30 IN SRV %d %d %d %s", name, pw[0], pw[1], 20000+i, target)), a)
		z.Extra[name] = append(z.Extra[name], a)
	}
	return z
}

// BenchmarkLookupCached measures what every new connection pays: a cache
// hit, a copy and a weighted shuffle. Target: under 1 µs and at most 2
// allocations per lookup.
func BenchmarkLookupCached(b *testing.B) {
	const name = "redis.service.consul."
	for _, bc := range []struct {
		name string
		z    *zone
	}{
		{"targets=1", consulZone(b, name, 1)},
		{"targets=3", consulZone(b, name, 3)},
		{"targets=12", consulZone(b, name, 12)},
		{"weighted=6", weightedZone(b, name)},
	} {
		b.Run(bc.name, func(b *testing.B) {
			s := startServer(b, bc.z.handle)
			r := newTestResolver(b, Config{MinTTL: time.Hour, MaxTTL: time.Hour}, nil, s)
			ctx := context.Background()
			if _, err := r.Lookup(ctx, name); err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				if _, err := r.Lookup(ctx, name); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			if n := s.queries.Load(); n != 1 {
				b.Fatalf("%d queries; want 1", n)
			}
		})
	}
	b.Run("parallel/targets=3", func(b *testing.B) {
		s := startServer(b, consulZone(b, name, 3).handle)
		r := newTestResolver(b, Config{MinTTL: time.Hour, MaxTTL: time.Hour}, nil, s)
		if _, err := r.Lookup(context.Background(), name); err != nil {
			b.Fatal(err)
		}
		b.ReportAllocs()
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, err := r.Lookup(context.Background(), name); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
}

// BenchmarkLookupCold measures a lookup that misses the cache and queries
// the in-process server over loopback UDP (glue in the additional section).
func BenchmarkLookupCold(b *testing.B) {
	const name = "redis.service.consul."
	s := startServer(b, consulZone(b, name, 3).handle)
	clock := testenv.NewClock()
	r := newTestResolver(b, Config{}, clock, s)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		clock.Advance(time.Hour) // expire the previous answer
		if _, err := r.Lookup(ctx, name); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkLookupDistinct measures what a container that names many
// distinct values costs: lookups of distinct ip:port values (no DNS, so
// the cache alone) into a fresh resolver, with the default cache size
// (which evicts beyond 10,000) and with one that holds every value.
// Target: O(1) per value, so ns/value stays flat as the count grows, and a
// live heap bounded by the cache size, reported as heap-B/entry.
func BenchmarkLookupDistinct(b *testing.B) {
	for _, bc := range []struct{ values, size int }{
		{1000, 0}, {20000, 0}, {65535, 0}, {65535, 65535},
	} {
		b.Run(fmt.Sprintf("values=%d/size=%d", bc.values, bc.size), func(b *testing.B) {
			values := make([]string, bc.values)
			for i := range values {
				values[i] = fmt.Sprintf("127.0.%d.%d:%d", i>>8&0xff, i&0xff, 1+i%65535)
			}
			cfg := Config{Servers: []string{"127.0.0.1:1"}, CacheSize: bc.size} // never asked: ip:port needs no DNS
			fill := func() *Resolver {
				r := newTestResolver(b, cfg, nil)
				ctx := context.Background()
				for _, v := range values {
					if _, err := r.Lookup(ctx, v); err != nil {
						b.Fatal(err)
					}
				}
				return r
			}
			b.ReportAllocs()
			for b.Loop() {
				fill()
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*bc.values), "ns/value")

			b.StopTimer()
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			r := fill()
			runtime.GC()
			runtime.ReadMemStats(&after)
			n := r.Stats().Entries
			b.ReportMetric(float64(n), "entries")
			b.ReportMetric(float64(int64(after.HeapAlloc)-int64(before.HeapAlloc))/float64(n), "heap-B/entry")
			runtime.KeepAlive(r)
		})
	}
}
