package sockpath

import (
	"errors"
	"net"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
)

// fakeMaps is the kernel's maps in memory, for tests of what the Path
// decides without root or a bpffs.
type fakeMaps struct {
	mu       sync.Mutex
	route    map[routeKey]uint32
	tables   map[uint32]*kernTable
	counts   map[kernCounterKey]kernEndpointCounters
	dead     map[netip.AddrPort]bool // marked by some namespace
	revived  []netip.AddrPort
	stat     []uint64
	ev       chan kernEvent
	done     chan struct{}
	doneOnce sync.Once
}

func newFakeMaps() *fakeMaps {
	return &fakeMaps{
		route: map[routeKey]uint32{}, tables: map[uint32]*kernTable{}, counts: map[kernCounterKey]kernEndpointCounters{},
		dead: map[netip.AddrPort]bool{}, stat: make([]uint64, kernStatNSTATS),
		ev: make(chan kernEvent, 16), done: make(chan struct{}),
	}
}

var _ Maps = (*fakeMaps)(nil)

func (f *fakeMaps) setRoute(k routeKey, id uint32) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.route[k] = id
	return nil
}

func (f *fakeMaps) deleteRoute(k routeKey) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.route, k)
	return nil
}

func (f *fakeMaps) routes() (map[routeKey]uint32, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := map[routeKey]uint32{}
	for k, v := range f.route {
		out[k] = v
	}
	return out, nil
}

func (f *fakeMaps) putTable(id uint32, t *kernTable) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := *t
	f.tables[id] = &c
	return nil
}

func (f *fakeMaps) deleteTable(id uint32) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.tables, id)
	return nil
}

func (f *fakeMaps) tableIDs() ([]uint32, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var ids []uint32
	for id := range f.tables {
		ids = append(ids, id)
	}
	return ids, nil
}

func (f *fakeMaps) tableEndpoints(id uint32) ([]netip.AddrPort, error) {
	f.mu.Lock()
	_, ok := f.tables[id]
	f.mu.Unlock()
	if !ok {
		return nil, errors.New("no such table")
	}
	return f.endpoints(id), nil
}

// endpoints returns what table id serves.
func (f *fakeMaps) endpoints(id uint32) []netip.AddrPort {
	f.mu.Lock()
	defer f.mu.Unlock()
	t := f.tables[id]
	if t == nil {
		return nil
	}
	var out []netip.AddrPort
	for _, ep := range t.Ep[:t.Nendpoints] {
		out = append(out, ep.addrPort())
	}
	return out
}

func (f *fakeMaps) ensureCounter(s uint32, ap netip.AddrPort) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	k := kernCounterKey{Service: s, Ep: endpoint(ap)}
	if _, ok := f.counts[k]; !ok {
		f.counts[k] = kernEndpointCounters{}
	}
	return nil
}

func (f *fakeMaps) deleteCounter(s uint32, ap netip.AddrPort) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.counts, kernCounterKey{Service: s, Ep: endpoint(ap)})
	return nil
}

func (f *fakeMaps) counters() ([]Counter, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []Counter
	for k, c := range f.counts {
		out = append(out, Counter{Service: k.Service, Endpoint: k.Ep.addrPort(), Connects: c.Connects, Failures: c.Failures})
	}
	return out, nil
}

func (f *fakeMaps) clearCounters() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	clear(f.counts)
	return nil
}

func (f *fakeMaps) deadEndpoints() ([]netip.AddrPort, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []netip.AddrPort
	for ap := range f.dead {
		out = append(out, ap)
	}
	return out, nil
}

func (f *fakeMaps) revive(ap netip.AddrPort) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.dead, ap)
	f.revived = append(f.revived, ap)
	return nil
}

func (f *fakeMaps) pruneDead() (int, error) { return 0, nil }

func (f *fakeMaps) wasRevived(ap netip.AddrPort) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Contains(f.revived, ap)
}

func (f *fakeMaps) stats() ([]uint64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.stat), nil
}

// report is what the kernel does on a namespace's evidence: the mark, the
// count, the event.
func (f *fakeMaps) report(cookie uint64, ap netip.AddrPort, kind kernEventKind) {
	f.mu.Lock()
	f.dead[ap] = true
	f.stat[kernStatSTAT_EVIDENCE]++
	f.mu.Unlock()
	f.ev <- kernEvent{Cookie: cookie, Kind: kind, Ep: endpoint(ap)}
}

func (f *fakeMaps) events() (eventReader, error) { return fakeEvents{f}, nil }

type fakeEvents struct{ f *fakeMaps }

func (e fakeEvents) read() (kernEvent, error) {
	select {
	case ev := <-e.f.ev:
		return ev, nil
	case <-e.f.done:
		return kernEvent{}, errEventsClosed
	}
}

func (e fakeEvents) Close() error {
	e.f.doneOnce.Do(func() { close(e.f.done) })
	return nil
}

func (f *fakeMaps) Remove() error { return nil }
func (f *fakeMaps) Close() error  { return nil }

// A namespace's evidence against an endpoint takes it out of the shared
// table only once the daemon's own probe fails; an endpoint the probe
// reaches stays for everyone. Without root: the kernel is the fake, the
// probes real dials on the loopback.
func TestEvidenceNeedsTheDaemonsProbe(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	live := netip.MustParseAddrPort(ln.Addr().String())
	closedLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := netip.MustParseAddrPort(closedLn.Addr().String())
	closedLn.Close()

	for _, tc := range []struct {
		name      string
		failed    netip.AddrPort
		wantTable []netip.AddrPort
		wantState string
		revived   bool
	}{
		{"the daemon cannot reach it", closed, []netip.AddrPort{live}, "dead", false},
		{"the daemon reaches it", live, []netip.AddrPort{live, closed}, "reachable", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fk := newFakeMaps()
			p, err := New(Config{Kernel: fk, Resolver: newFakeResolver(time.Hour), RetryMin: 20 * time.Millisecond,
				RetryMax: 100 * time.Millisecond, Logger: testenv.Logger(t, &testenv.SyncBuffer{})})
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			p.mu.Lock()
			tbl, err := p.acquire("s", []candidate{{addr: live, weight: 1, target: 0}, {addr: closed, weight: 1, target: 1}})
			p.mu.Unlock()
			if err != nil {
				t.Fatal(err)
			}
			if got := fk.endpoints(tbl.id); len(got) != 2 {
				t.Fatalf("table before any evidence: %v", got)
			}
			fk.report(42, tc.failed, eventFailed)
			eventually(t, "the daemon probes the endpoint", func() bool {
				h := p.Health()
				return len(h) == 1 && h[0].State == tc.wantState
			})
			got := fk.endpoints(tbl.id)
			slices.SortFunc(got, func(a, b netip.AddrPort) int { return a.Compare(b) })
			want := slices.Clone(tc.wantTable)
			slices.SortFunc(want, func(a, b netip.AddrPort) int { return a.Compare(b) })
			if !slices.Equal(got, want) {
				t.Errorf("table after namespace 42's evidence against %v: %v; want %v", tc.failed, got, want)
			}
			if fk.wasRevived(tc.failed) != tc.revived {
				t.Errorf("namespace 42's mark cleared: %v; want %v (it lapses on its own)", !tc.revived, tc.revived)
			}
			s, err := p.KernelStats()
			if err != nil || s.Evidence != 1 {
				t.Errorf("KernelStats = %+v, %v; want the one report", s, err)
			}
		})
	}
}

// Endpoints the daemon confirmed dead may all go: the table then serves
// nothing, and connects fall to the relay, which tries each.
func TestAllConfirmedDeadLeavesTheTableEmpty(t *testing.T) {
	var dead []netip.AddrPort
	for range 2 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		dead = append(dead, netip.MustParseAddrPort(ln.Addr().String()))
		ln.Close()
	}
	fk := newFakeMaps()
	p, err := New(Config{Kernel: fk, Resolver: newFakeResolver(time.Hour), RetryMin: 20 * time.Millisecond,
		RetryMax: 100 * time.Millisecond, Logger: testenv.Logger(t, &testenv.SyncBuffer{})})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	p.mu.Lock()
	tbl, err := p.acquire("s", []candidate{{addr: dead[0], weight: 1, target: 0}, {addr: dead[1], weight: 1, target: 1}})
	p.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	fk.report(1, dead[0], eventFailed)
	fk.report(2, dead[1], eventSYNRetry)
	eventually(t, "both endpoints leave the table", func() bool { return len(fk.endpoints(tbl.id)) == 0 })
	fk.mu.Lock()
	nslots := fk.tables[tbl.id].Nslots
	fk.mu.Unlock()
	if nslots != 0 {
		t.Errorf("a table with no live endpoint has %d slots; want 0 (the kernel leaves its connects to the relay)", nslots)
	}
}
