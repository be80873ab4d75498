package resolver

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
)

// startDnsmasq runs a real dnsmasq on a free loopback port with args.
func startDnsmasq(t *testing.T, args ...string) *testenv.DNSServer {
	t.Helper()
	return testenv.StartDnsmasq(t, 0, args...)
}

// webArgs describes a service with weights 60/30/10 at priority 10 (an A
// target, a dual-stack one, an AAAA-only one) and a backup at priority 20.
var webArgs = []string{
	"--local=/test/", // unknown names under .test: NXDOMAIN
	"--local-ttl=30",
	"--srv-host=_web._tcp.svc.test,one.test,8001,10,60",
	"--srv-host=_web._tcp.svc.test,two.test,8002,10,30",
	"--srv-host=_web._tcp.svc.test,three.test,8003,10,10",
	"--srv-host=_web._tcp.svc.test,backup.test,8004,20,0",
	"--host-record=one.test,127.0.0.1",
	"--host-record=two.test,127.0.0.2,::2",
	"--host-record=three.test,::3",
	"--host-record=backup.test,127.0.0.4",
	"--srv-host=_lost._tcp.svc.test,nowhere.test,9000,1,1",
}

var wantDnsmasqWeb = []string{"127.0.0.1:8001", "127.0.0.2:8002", "[::2]:8002", "[::3]:8003", "127.0.0.4:8004"}

func TestDnsmasqSRV(t *testing.T) {
	d := startDnsmasq(t, webArgs...)
	r := newTestResolver(t, Config{Servers: []string{d.Addr}}, testenv.NewClock())

	wantSet(t, lookup(t, r, "_web._tcp.svc.test"), wantDnsmasqWeb...)
	// dnsmasq sends the targets' A and AAAA records as additional records,
	// so one query suffices.
	if st := r.Stats(); st.Queries != 1 {
		t.Errorf("%d queries; want 1 (addresses from the additional section): %+v", st.Queries, st)
	}

	// Order: priority 10 (weighted) before the priority 20 backup.
	const calls = 20000
	first := map[uint16]int{}
	for range calls {
		eps := lookup(t, r, "_web._tcp.svc.test")
		if last := eps[len(eps)-1]; last.String() != "127.0.0.4:8004" {
			t.Fatalf("order %v: want the priority-20 target last", eps)
		}
		first[eps[0].Port()]++
	}
	for port, want := range map[uint16]float64{8001: 0.6, 8002: 0.3, 8003: 0.1} {
		if got := float64(first[port]) / calls; got < want-0.03 || got > want+0.03 {
			t.Errorf("port %d first in %.3f of calls; want %.2f ± 0.03", port, got, want)
		}
	}

	// Case does not matter to the server nor to matching the glue.
	wantSet(t, lookup(t, r, "_WEB._tcp.SVC.test."), wantDnsmasqWeb...)
}

func TestDnsmasqErrorsAndHostPort(t *testing.T) {
	d := startDnsmasq(t, webArgs...)
	r := newTestResolver(t, Config{Servers: []string{d.Addr}}, testenv.NewClock())

	if err := lookupErr(t, r, "nope.svc.test"); !errors.Is(err, ErrNoSuchName) || !strings.Contains(err.Error(), "nope.svc.test.") {
		t.Errorf("unknown name: err = %v (%s); want no such name naming it", err, kindOf(err))
	}
	if err := lookupErr(t, r, "_lost._tcp.svc.test"); !errors.Is(err, ErrNoEndpoints) {
		t.Errorf("target without address: err = %v (%s); want no endpoints", err, kindOf(err))
	}
	wantSet(t, lookup(t, r, "two.test:5432"), "127.0.0.2:5432", "[::2]:5432")
	wantSet(t, lookup(t, r, "three.test:80"), "[::3]:80")
	if err := lookupErr(t, r, "nowhere.test:80"); !errors.Is(err, ErrNoSuchName) {
		t.Errorf("unknown host: err = %v (%s); want no such name", err, kindOf(err))
	}
}

func TestDnsmasqFailover(t *testing.T) {
	// The first dnsmasq is not authoritative for .test and has no
	// upstream: it refuses the query, and the second one answers.
	bad := startDnsmasq(t, "--srv-host=_x._tcp.other.example,one.example,1")
	good := startDnsmasq(t, webArgs...)
	r := newTestResolver(t, Config{Servers: []string{bad.Addr, good.Addr}}, testenv.NewClock())
	wantSet(t, lookup(t, r, "_web._tcp.svc.test"), wantDnsmasqWeb...)
	if st := r.Stats(); st.Queries != 2 || st.QueryErrors != 1 {
		t.Errorf("stats = %+v; want 2 queries, the first failed", st)
	}

	// With only the refusing server: an error naming it.
	r = newTestResolver(t, Config{Servers: []string{bad.Addr}}, testenv.NewClock())
	err := lookupErr(t, r, "_web._tcp.svc.test")
	if !errors.Is(err, ErrServerFailure) || !strings.Contains(err.Error(), bad.Addr) {
		t.Errorf("err = %v (%s); want a server failure naming %s", err, kindOf(err), bad.Addr)
	}
	t.Logf("refusing dnsmasq: %v", err)
}

func TestDnsmasqTruncationAndTTL(t *testing.T) {
	// 60 targets do not fit in dnsmasq's UDP replies: it sets TC, and the
	// resolver asks again over TCP.
	args := []string{"--local=/test/", "--local-ttl=30"}
	var want []string
	for i := range 60 {
		target := fmt.Sprintf("a-rather-long-target-name-%02d.node.test", i)
		args = append(args,
			fmt.Sprintf("--srv-host=big.svc.test,%s,%d,1,1", target, 9000+i),
			fmt.Sprintf("--host-record=%s,127.0.2.%d", target, i))
		want = append(want, fmt.Sprintf("127.0.2.%d:%d", i, 9000+i))
	}
	d := startDnsmasq(t, args...)
	clock := testenv.NewClock()
	r := newTestResolver(t, Config{Servers: []string{d.Addr}}, clock)
	wantSet(t, lookup(t, r, "big.svc.test"), want...)
	st := r.Stats()
	t.Logf("stats after the first lookup: %+v", st)
	if st.Truncated != 1 {
		t.Errorf("Stats().Truncated = %d; want 1 (UDP reply truncated, retried over TCP)", st.Truncated)
	}

	// TTL 30: cached for 29 s, asked again after 31.
	clock.Advance(29 * time.Second)
	lookup(t, r, "big.svc.test")
	if n := r.Stats().Queries; n != st.Queries {
		t.Fatalf("%d queries after 29s; want %d (cached)", n, st.Queries)
	}
	clock.Advance(2 * time.Second)
	lookup(t, r, "big.svc.test")
	if n := r.Stats().Queries; n <= st.Queries {
		t.Fatalf("no query after 31s; want the answer expired")
	}
}

func TestDnsmasqStaleAndConcurrent(t *testing.T) {
	d := startDnsmasq(t, webArgs...)
	clock := testenv.NewClock()
	r := newTestResolver(t, Config{Servers: []string{d.Addr}, StaleFor: time.Minute}, clock)

	const callers = 50
	var wg sync.WaitGroup
	for range callers {
		wg.Go(func() {
			eps, err := r.Lookup(context.Background(), "_web._tcp.svc.test")
			if err != nil || len(eps) != len(wantDnsmasqWeb) {
				t.Errorf("concurrent Lookup = %v, %v", eps, err)
			}
		})
	}
	wg.Wait()
	if st := r.Stats(); st.Queries != 1 || st.CacheMisses != 1 || st.CacheHits+st.Shared != callers-1 {
		t.Fatalf("stats after %d concurrent lookups = %+v; want 1 query", callers, st)
	}

	d.Stop()
	clock.Advance(31 * time.Second)
	wantSet(t, lookup(t, r, "_web._tcp.svc.test"), wantDnsmasqWeb...)
	if st := r.Stats(); st.StaleServed != 1 {
		t.Errorf("Stats().StaleServed = %d; want 1", st.StaleServed)
	}
	clock.Advance(time.Minute)
	if err := lookupErr(t, r, "_web._tcp.svc.test"); !errors.Is(err, ErrServerFailure) {
		t.Fatalf("after StaleFor: err = %v (%s); want a server failure", err, kindOf(err))
	}
}
