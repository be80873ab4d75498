package sockpath

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
)

// TestAdoptChecksPolicy: a previous run's table holding an endpoint the
// current target policy refuses is dropped at adoption, with its routes,
// before any Apply; the other tables keep serving.
func TestAdoptChecksPolicy(t *testing.T) {
	f := newFixture(t)
	b1 := startBackend(t, f.ns, "b1", "198.18.201.1:0")
	b2 := startBackend(t, f.ns, "b2", "198.18.201.2:0")
	f.res.set("one", group(1, []netip.AddrPort{b1.addr}))
	f.res.set("mixed", group(1, []netip.AddrPort{b1.addr, b2.addr}))
	f.apply(map[uint16]string{6000: "one", 6001: "mixed"})
	if err := f.p.Abandon(); err != nil { // what a restart leaves
		t.Fatal(err)
	}

	// The operator now denies b2's address.
	k := loadKernel(t, f.dir)
	p, err := New(Config{Kernel: k, Resolver: f.res, Logger: testenv.Logger(t, f.logs),
		Allowed: func(a netip.Addr) error {
			if a == b2.addr.Addr() {
				return fmt.Errorf("%s: refused", a)
			}
			return nil
		}})
	if err != nil {
		k.Remove()
		t.Fatal(err)
	}
	f.p = p
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	cookie, err := NetNSCookie(f.ns)
	if err != nil {
		t.Fatal(err)
	}
	routes, err := k.routes()
	if err != nil {
		t.Fatal(err)
	}
	// The endpoints are IPv4: only the IPv4 family had a route.
	if _, ok := routes[newRouteKey(cookie, 6000, false)]; !ok {
		t.Errorf("the IPv4 route of port 6000, all allowed, was not adopted: %v", routes)
	}
	for _, v6 := range []bool{false, true} {
		if _, ok := routes[newRouteKey(cookie, 6001, v6)]; ok {
			t.Errorf("the route of port 6001 (v6 %v), to a refused endpoint, survived adoption", v6)
		}
	}
	if ids, _ := k.tableIDs(); len(ids) != 1 {
		t.Errorf("tables after adoption: %v; want the allowed one alone", ids)
	}
	if f.logs.Count("dropping a previous run's table the target policy refuses") == 0 {
		t.Errorf("no log line names the dropped table:\n%s", f.logs)
	}
	if name, _ := mustDial(t, f.ns, "127.0.0.1:6000"); name != "b1" {
		t.Errorf("the adopted port 6000 reached %q; want b1", name)
	}
	for range 10 {
		if name, _, err := dialTimeout(f.ns, "127.0.0.1:6001", time.Second); err == nil {
			t.Fatalf("port 6001 reached %q after adoption under a policy refusing b2", name)
		}
	}
}
