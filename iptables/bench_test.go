package iptables_test

import (
	"net"
	"slices"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
	"github.com/connectable/connectable/iptables"
	"github.com/connectable/connectable/netns"
)

// setUp does what the proxy does for a new namespace: the port of earlier
// rules, both listeners, then both families of rules for two labelled
// ports. It returns how long that took and a function closing the
// listeners.
func setUp(b *testing.B, nat *iptables.NAT, ns string) (time.Duration, func()) {
	return setUpEvicting(b, nat, ns, "")
}

// setUpEvicting is setUp with, when evict is not empty, a Port call on the
// namespace evict between Port and Apply, outside the measured time: Apply
// then cannot reuse Port's listings, as when set-ups of several namespaces
// interleave.
func setUpEvicting(b *testing.B, nat *iptables.NAT, ns, evict string) (time.Duration, func()) {
	start := time.Now()
	port, err := nat.Port(ns)
	if err != nil {
		b.Fatalf("Port: %v", err)
	}
	if evict != "" {
		paused := time.Now()
		if _, err := nat.Port(evict); err != nil {
			b.Fatalf("Port: %v", err)
		}
		start = start.Add(time.Since(paused))
	}
	v4, v6, err := netns.Listen(ns, port)
	if err != nil {
		b.Fatalf("netns.Listen: %v", err)
	}
	if err := nat.Apply(ns, []uint16{6000, 6001}, uint16(v4.Addr().(*net.TCPAddr).Port)); err != nil {
		b.Fatalf("Apply: %v", err)
	}
	d := time.Since(start)
	if v6 == nil {
		b.Fatalf("no IPv6 listener")
	}
	return d, func() { v4.Close(); v6.Close() }
}

func reportMedian(b *testing.B, durs []time.Duration) {
	slices.Sort(durs)
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	b.ReportMetric(ms(durs[len(durs)/2]), "ms-median/netns")
	b.ReportMetric(ms(durs[len(durs)*9/10]), "ms-p90/netns")
}

func benchBackends(b *testing.B, fn func(b *testing.B, nat *iptables.NAT)) {
	testenv.NeedRoot(b)
	testenv.GuardRootRules(b)
	for _, backend := range backends {
		b.Run(backend, func(b *testing.B) {
			testenv.NeedCommand(b, "iptables-"+backend, "ip6tables-"+backend)
			nat, err := iptables.New(iptables.Config{Backend: backend, Logger: testLogger(b)})
			if err != nil {
				b.Fatal(err)
			}
			fn(b, nat)
		})
	}
}

// BenchmarkSetUpOne times the set-up of one fresh namespace per iteration;
// the namespace is made outside the timed region.
func BenchmarkSetUpOne(b *testing.B) {
	benchBackends(b, func(b *testing.B, nat *iptables.NAT) {
		var durs []time.Duration
		b.StopTimer()
		for range b.N {
			ns := testenv.NewNetNS(b)
			b.StartTimer()
			d, closeAll := setUp(b, nat, ns)
			b.StopTimer()
			closeAll()
			durs = append(durs, d)
		}
		reportMedian(b, durs)
	})
}

// BenchmarkSetUpOneNoReuse is BenchmarkSetUpOne with Apply unable to reuse
// Port's listings: the difference is what that reuse saves.
func BenchmarkSetUpOneNoReuse(b *testing.B) {
	benchBackends(b, func(b *testing.B, nat *iptables.NAT) {
		other := testenv.NewNetNS(b)
		var durs []time.Duration
		b.StopTimer()
		for range b.N {
			ns := testenv.NewNetNS(b)
			b.StartTimer()
			d, closeAll := setUpEvicting(b, nat, ns, other)
			b.StopTimer()
			closeAll()
			durs = append(durs, d)
		}
		reportMedian(b, durs)
	})
}

// BenchmarkSetUp100 times the set-up of 100 fresh namespaces in a row, as a
// daemon starting on a busy host does; one iteration is all 100.
func BenchmarkSetUp100(b *testing.B) {
	benchBackends(b, func(b *testing.B, nat *iptables.NAT) {
		var durs []time.Duration
		b.StopTimer()
		for range b.N {
			nss := make([]string, 100)
			for i := range nss {
				nss[i] = testenv.NewNetNS(b)
			}
			var closers []func()
			b.StartTimer()
			for _, ns := range nss {
				d, closeAll := setUp(b, nat, ns)
				durs = append(durs, d)
				closers = append(closers, closeAll)
			}
			b.StopTimer()
			for _, c := range closers {
				c()
			}
		}
		reportMedian(b, durs)
	})
}

// BenchmarkApplyUnchanged times the periodic resync's Apply to a namespace
// whose rules are already right: listings only, no write.
func BenchmarkApplyUnchanged(b *testing.B) {
	benchBackends(b, func(b *testing.B, nat *iptables.NAT) {
		ns := testenv.NewNetNS(b)
		if err := nat.Apply(ns, []uint16{6000, 6001}, 40000); err != nil {
			b.Fatal(err)
		}
		for b.Loop() {
			if err := nat.Apply(ns, []uint16{6000, 6001}, 40000); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkApplyNewTarget times an Apply that replaces every rule (a new
// proxy port), the costly case: nf_tables waits out an RCU grace period for
// each transaction that deletes rules.
func BenchmarkApplyNewTarget(b *testing.B) {
	benchBackends(b, func(b *testing.B, nat *iptables.NAT) {
		ns := testenv.NewNetNS(b)
		i := 0
		for b.Loop() {
			i++
			if err := nat.Apply(ns, []uint16{6000, 6001}, 40000+uint16(i%2)); err != nil {
				b.Fatal(err)
			}
		}
	})
}
