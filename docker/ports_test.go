package docker

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	dockerapi "github.com/fsouza/go-dockerclient"

	"github.com/connectable/connectable/internal/testenv"
)

// hostAddrs is a settable stand-in for this host's addresses.
type hostAddrs struct {
	mu    sync.Mutex
	addrs []netip.Addr
}

func (h *hostAddrs) set(addrs ...string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.addrs = nil
	for _, a := range addrs {
		h.addrs = append(h.addrs, netip.MustParseAddr(a))
	}
}

func (h *hostAddrs) get() ([]netip.Addr, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.addrs), nil
}

// newFakePortTable returns a port table on f with a fake clock and the
// host addresses 192.0.2.10, 192.0.2.11, 2001:db8::10 and loopback.
func newFakePortTable(t *testing.T, f *fakeEngine) (*PortTable, *testenv.Clock, *hostAddrs) {
	logger, _ := newLogger(t)
	p := newPortTable(f, logger)
	clock := testenv.NewClock()
	hosts := &hostAddrs{}
	hosts.set("192.0.2.10", "192.0.2.11", "2001:db8::10", "127.0.0.1", "::1")
	p.now, p.hostAddrs = clock.Now, hosts.get
	return p, clock, hosts
}

// publish attaches id to networks (name → "ip/len", v4 or v6) and gives it
// the published ports, as "ip:public->private/proto" ("ip" may be empty).
func (f *fakeEngine) publish(t *testing.T, id string, networks map[string][]string, ports ...string) {
	t.Helper()
	nets := make(map[string]dockerapi.ContainerNetwork)
	for name, addrs := range networks {
		var n dockerapi.ContainerNetwork
		for _, a := range addrs {
			pfx := netip.MustParsePrefix(a)
			if pfx.Addr().Is4() {
				n.IPAddress, n.IPPrefixLen = pfx.Addr().String(), pfx.Bits()
			} else {
				n.GlobalIPv6Address, n.GlobalIPv6PrefixLen = pfx.Addr().String(), pfx.Bits()
			}
		}
		nets[name] = n
	}
	var ps []dockerapi.APIPort
	for _, s := range ports {
		var p dockerapi.APIPort
		hostPart, rest, ok := strings.Cut(s, "->")
		if !ok {
			t.Fatalf("bad port %q", s)
		}
		i := strings.LastIndexByte(hostPart, ':')
		p.IP = strings.Trim(hostPart[:i], "[]")
		if _, err := fmt.Sscanf(hostPart[i+1:], "%d", &p.PublicPort); err != nil {
			t.Fatalf("bad port %q: %v", s, err)
		}
		priv, proto, _ := strings.Cut(rest, "/")
		if _, err := fmt.Sscanf(priv, "%d", &p.PrivatePort); err != nil {
			t.Fatalf("bad port %q: %v", s, err)
		}
		p.Type = proto
		ps = append(ps, p)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.world[id].NetworkSettings = &dockerapi.NetworkSettings{Networks: nets}
	f.published[id] = ps
}

func (f *fakeEngine) listCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.lists
}

// listings describes the fake engine's listings for waitFor's messages.
type listings struct{ f *fakeEngine }

func (l listings) String() string { return fmt.Sprintf("%d listings", l.f.listCount()) }

// directs renders a Lookup's result as "addr subnet container" lines.
func directs(ds []Direct, ok bool) string {
	if !ok {
		return "not published"
	}
	var out []string
	for _, d := range ds {
		out = append(out, fmt.Sprintf("%s %s %s", d.Addr, d.Subnet, d.Container))
	}
	return "[" + strings.Join(out, ", ") + "]"
}

func lookupPort(t *testing.T, p *PortTable, ep string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ds, ok, err := p.Lookup(ctx, netip.MustParseAddrPort(ep))
	if err != nil {
		t.Fatalf("Lookup(%s): %v", ep, err)
	}
	return directs(ds, ok)
}

func TestPortTableMatching(t *testing.T) {
	f := newFakeEngine()
	web := f.add("web", "", nil)
	f.publish(t, web, map[string][]string{"app": {"198.18.214.5/24", "fd00:db8::5/64"}},
		"192.0.2.10:32768->80/tcp",
		"0.0.0.0:32769->443/tcp", // published on both families: listed twice
		"[::]:32769->443/tcp",
		"0.0.0.0:32770->53/udp",
		":0->9000/tcp", // exposed, not published
	)
	v6 := f.add("v6", "", nil)
	f.publish(t, v6, map[string][]string{"app": {"198.18.214.6/24"}}, "[::]:32771->8080/tcp")
	db := f.add("db", "", nil) // Podman lists an all-addresses binding without an IP
	f.publish(t, db, map[string][]string{"front": {"198.18.214.7/24"}, "back": {"10.88.0.7/16"}}, ":32772->5432/tcp")
	lone := f.add("lone", "", nil)
	f.publish(t, lone, nil, "0.0.0.0:32773->1/tcp")
	p, _, _ := newFakePortTable(t, f)

	w, d, v := short(web), short(db), short(v6)
	for _, tc := range []struct{ name, ep, want string }{
		{"specific binding", "192.0.2.10:32768", "[198.18.214.5:80 198.18.214.0/24 " + w + ", [fd00:db8::5]:80 fd00:db8::/64 " + w + "]"},
		{"specific binding, other host address", "192.0.2.11:32768", "not published"},
		{"0.0.0.0, a host address", "192.0.2.11:32769", "[198.18.214.5:443 198.18.214.0/24 " + w + ", [fd00:db8::5]:443 fd00:db8::/64 " + w + "]"},
		{"0.0.0.0, loopback", "127.0.0.1:32769", "[198.18.214.5:443 198.18.214.0/24 " + w + ", [fd00:db8::5]:443 fd00:db8::/64 " + w + "]"},
		{"0.0.0.0, v4-mapped host address", "[::ffff:192.0.2.11]:32769", "[198.18.214.5:443 198.18.214.0/24 " + w + ", [fd00:db8::5]:443 fd00:db8::/64 " + w + "]"},
		{"0.0.0.0, not a host address", "203.0.113.1:32769", "not published"},
		{"::, a v6 host address", "[2001:db8::10]:32769", "[198.18.214.5:443 198.18.214.0/24 " + w + ", [fd00:db8::5]:443 fd00:db8::/64 " + w + "]"},
		{"::, not a host address", "[2001:db8::99]:32769", "not published"},
		{"udp only", "192.0.2.10:32770", "not published"},
		{"exposed port", "192.0.2.10:9000", "not published"},
		{"unused port", "192.0.2.10:32999", "not published"},
		{":: only, v6 host address", "[2001:db8::10]:32771", "[198.18.214.6:8080 198.18.214.0/24 " + v + "]"},
		{":: only, v4 host address", "192.0.2.10:32771", "not published"},
		{"no IP, v4", "192.0.2.10:32772", "[10.88.0.7:5432 10.88.0.0/16 " + d + ", 198.18.214.7:5432 198.18.214.0/24 " + d + "]"},
		{"no IP, v6", "[2001:db8::10]:32772", "[10.88.0.7:5432 10.88.0.0/16 " + d + ", 198.18.214.7:5432 198.18.214.0/24 " + d + "]"},
		{"no IP, not a host address", "198.51.100.1:32772", "not published"},
		{"container without addresses", "192.0.2.10:32773", "[]"},
		{"port 0", "192.0.2.10:0", "not published"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := lookupPort(t, p, tc.ep); got != tc.want {
				t.Errorf("Lookup(%s) = %s; want %s", tc.ep, got, tc.want)
			}
		})
	}
	if n := f.listCount(); n != 1 {
		t.Errorf("%d listings for every lookup within 2s; want 1", n)
	}
}

func TestPortTableResultIsACopy(t *testing.T) {
	f := newFakeEngine()
	id := f.add("web", "", nil)
	f.publish(t, id, map[string][]string{"app": {"198.18.214.5/24"}}, "0.0.0.0:32768->80/tcp")
	p, _, _ := newFakePortTable(t, f)
	ds, ok, err := p.Lookup(context.Background(), netip.MustParseAddrPort("192.0.2.10:32768"))
	if err != nil || !ok || len(ds) != 1 {
		t.Fatalf("Lookup = %v, %v, %v; want one direct", ds, ok, err)
	}
	want := directs(ds, ok)
	ds[0].Addr = netip.MustParseAddrPort("192.0.2.1:1")
	_ = append(ds[:0], Direct{})
	if got := lookupPort(t, p, "192.0.2.10:32768"); got != want {
		t.Errorf("after modifying a result: %s; want %s", got, want)
	}
}

func TestPortTableCacheAgeAndInvalidate(t *testing.T) {
	f := newFakeEngine()
	id := f.add("web", "", nil)
	f.publish(t, id, map[string][]string{"app": {"198.18.214.5/24"}}, "0.0.0.0:32768->80/tcp")
	p, clock, _ := newFakePortTable(t, f)
	const ep = "192.0.2.10:32768"
	want := "[198.18.214.5:80 198.18.214.0/24 " + short(id) + "]"

	wantLists := func(n int, when string) {
		t.Helper()
		if got := f.listCount(); got != n {
			t.Fatalf("%s: %d listings; want %d", when, got, n)
		}
	}
	for range 10 {
		if got := lookupPort(t, p, ep); got != want {
			t.Fatalf("Lookup = %s; want %s", got, want)
		}
	}
	wantLists(1, "ten lookups")
	clock.Advance(portsMaxAge - time.Millisecond)
	lookupPort(t, p, ep)
	wantLists(1, "just under 2s later")
	clock.Advance(time.Millisecond)
	lookupPort(t, p, ep)
	wantLists(2, "2s after the listing")

	// Gone: the cached listing still says published, until Invalidate.
	f.remove(id)
	if got := lookupPort(t, p, ep); got != want {
		t.Fatalf("before Invalidate: Lookup = %s; want the cached %s", got, want)
	}
	wantLists(2, "before Invalidate")
	p.Invalidate()
	if got := lookupPort(t, p, ep); got != "not published" {
		t.Errorf("after Invalidate: Lookup = %s; want not published", got)
	}
	wantLists(3, "after Invalidate")
	p.Invalidate()
	p.Invalidate()
	lookupPort(t, p, ep)
	lookupPort(t, p, ep)
	wantLists(4, "two Invalidates, two lookups")
}

func TestPortTableConcurrentLookupsShareOneListing(t *testing.T) {
	f := newFakeEngine()
	id := f.add("web", "", nil)
	f.publish(t, id, map[string][]string{"app": {"198.18.214.5/24"}}, "0.0.0.0:32768->80/tcp")
	p, _, _ := newFakePortTable(t, f)
	release := make(chan struct{})
	f.onList = func() { <-release }

	const callers = 20
	results := make(chan string, callers)
	var wg sync.WaitGroup
	for range callers {
		wg.Go(func() {
			ds, ok, err := p.Lookup(context.Background(), netip.MustParseAddrPort("192.0.2.10:32768"))
			if err != nil {
				results <- err.Error()
				return
			}
			results <- directs(ds, ok)
		})
	}
	waitFor(t, "the first listing", func() bool { return f.listCount() == 1 }, listings{f})
	// Give the other callers time to arrive at the listing in flight; one
	// that is late finds it cached, so this cannot fail a correct table,
	// while a table that lists per caller lists again (unblocked: onList
	// fires once) in this time.
	time.Sleep(200 * time.Millisecond)
	close(release)
	wg.Wait()
	close(results)
	want := "[198.18.214.5:80 198.18.214.0/24 " + short(id) + "]"
	for got := range results {
		if got != want {
			t.Errorf("Lookup = %s; want %s", got, want)
		}
	}
	if n := f.listCount(); n != 1 {
		t.Errorf("%d listings for %d concurrent lookups; want 1", n, callers)
	}
}

// TestPortTableInvalidateDuringListing: a listing started before an
// Invalidate serves the callers that were waiting for it, not those that
// came after the Invalidate.
func TestPortTableInvalidateDuringListing(t *testing.T) {
	f := newFakeEngine()
	id := f.add("web", "", nil)
	f.publish(t, id, map[string][]string{"app": {"198.18.214.5/24"}}, "0.0.0.0:32768->80/tcp")
	p, _, _ := newFakePortTable(t, f)
	release := make(chan struct{})
	f.onList = func() { <-release } // after the snapshot that still shows id

	lookupAsync := func() <-chan string {
		ch := make(chan string, 1)
		go func() {
			ds, ok, err := p.Lookup(context.Background(), netip.MustParseAddrPort("192.0.2.10:32768"))
			if err != nil {
				ch <- err.Error()
				return
			}
			ch <- directs(ds, ok)
		}()
		return ch
	}
	before := lookupAsync()
	waitFor(t, "the first listing", func() bool { return f.listCount() == 1 }, listings{f})
	f.remove(id)
	p.Invalidate()
	after := lookupAsync()
	time.Sleep(100 * time.Millisecond) // let it find the listing in flight, if it will
	close(release)
	if got, want := <-before, "[198.18.214.5:80 198.18.214.0/24 "+short(id)+"]"; got != want {
		t.Errorf("lookup before Invalidate = %s; want %s", got, want)
	}
	if got := <-after; got != "not published" {
		t.Errorf("lookup after Invalidate = %s; want not published (a listing of its own)", got)
	}
	if n := f.listCount(); n != 2 {
		t.Errorf("%d listings; want 2", n)
	}
}

func TestPortTableChanged(t *testing.T) {
	f := newFakeEngine()
	id := f.add("web", "", nil)
	f.publish(t, id, map[string][]string{"app": {"198.18.214.5/24"}}, "0.0.0.0:32768->80/tcp")
	p, _, hosts := newFakePortTable(t, f)
	const ep = "192.0.2.10:32768"

	signalled := func() bool {
		select {
		case <-p.Changed():
			return true
		default:
			return false
		}
	}
	// Invalidate signals by itself (look again); what follows checks
	// what the listing after it adds.
	relist := func() {
		t.Helper()
		p.Invalidate()
		if !signalled() {
			t.Errorf("no Changed after Invalidate")
		}
		lookupPort(t, p, ep)
	}
	lookupPort(t, p, ep)
	if signalled() {
		t.Errorf("Changed after the first listing; want nothing")
	}
	relist()
	if signalled() {
		t.Errorf("Changed after an identical listing; want nothing")
	}
	other := f.add("other", "", nil) // unpublished: does not change any answer
	relist()
	if signalled() {
		t.Errorf("Changed after a container without published ports started; want nothing")
	}
	f.publish(t, other, map[string][]string{"app": {"198.18.214.6/24"}}, "0.0.0.0:32769->80/tcp")
	relist()
	if !signalled() {
		t.Errorf("no Changed after a new published port")
	}
	f.publish(t, id, map[string][]string{"app": {"198.18.214.9/24"}}, "0.0.0.0:32768->80/tcp")
	relist()
	if !signalled() {
		t.Errorf("no Changed after a container's address changed")
	}
	hosts.set("192.0.2.10")
	relist()
	if !signalled() {
		t.Errorf("no Changed after this host's addresses changed")
	}

	// Changes nobody has received yet coalesce into one value, and the
	// listing does not block on the full channel.
	f.remove(other)
	p.Invalidate()
	lookupPort(t, p, ep)
	f.remove(id)
	p.Invalidate()
	lookupPort(t, p, ep)
	if !signalled() || signalled() {
		t.Errorf("two changes unreceived: want exactly one value waiting")
	}
}

func TestPortTableErrors(t *testing.T) {
	f := newFakeEngine()
	id := f.add("web", "", nil)
	f.publish(t, id, map[string][]string{"app": {"198.18.214.5/24"}}, "0.0.0.0:32768->80/tcp")
	p, _, _ := newFakePortTable(t, f)
	ep := netip.MustParseAddrPort("192.0.2.10:32768")

	f.setDown(true)
	if ds, ok, err := p.Lookup(context.Background(), ep); !errors.Is(err, errEngineDown) || ok || ds != nil {
		t.Errorf("engine down: Lookup = %v, %v, %v; want the engine's error", ds, ok, err)
	}
	// A failure is not cached: the engine back, the next Lookup lists.
	f.setDown(false)
	if got := lookupPort(t, p, ep.String()); got == "not published" {
		t.Errorf("engine back: Lookup = %s; want published", got)
	}

	// A caller that gives up while waiting for the listing gets its
	// context's error; the listing caller is not affected.
	p.Invalidate()
	release := make(chan struct{})
	f.onList = func() { <-release }
	leader := make(chan error, 1)
	go func() {
		_, _, err := p.Lookup(context.Background(), ep)
		leader <- err
	}()
	waitFor(t, "the listing", func() bool { return f.listCount() == 3 }, listings{f})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, _, err := p.Lookup(ctx, ep); !errors.Is(err, context.Canceled) {
		t.Errorf("canceled waiting caller: err = %v; want context.Canceled", err)
	}
	close(release)
	if err := <-leader; err != nil {
		t.Errorf("listing caller: err = %v; want nil", err)
	}
}

func TestWatcherInvalidatesPortTable(t *testing.T) {
	f := newFakeEngine()
	sink := newRecordingSink()
	w, _ := newFakeWatcher(t, f, sink, time.Hour)
	p, _, _ := newFakePortTable(t, f)
	w.cfg.Ports = p
	startWatcher(t, w)
	waitFor(t, "healthy", w.Healthy, sink)
	gen := func() uint64 {
		p.mu.Lock()
		defer p.mu.Unlock()
		return p.gen
	}

	// An unlabelled container matters to the port table all the same. The
	// events are handled in order, so once the lifecycle event's
	// invalidation shows, the one before it would have too.
	id := f.add("plain", "", nil)
	f.emit("exec_start", id)
	f.emit("start", id)
	waitFor(t, "an invalidation", func() bool { return gen() > 0 }, sink)
	if g := gen(); g != 1 {
		t.Errorf("%d invalidations after a non-lifecycle and a lifecycle event; want 1", g)
	}
	for i, action := range []string{"die", "destroy", "remove", "died"} { // Docker's and Podman's names
		f.emit(action, id)
		waitFor(t, action+" invalidating", func() bool { return gen() == uint64(i)+2 }, sink)
	}
}

// TestPortTableRealEngine publishes a port of a container on a network of
// its own, on the network's gateway address (what Registrator would
// register), and looks it up. No traffic is sent.
func TestPortTableRealEngine(t *testing.T) {
	testenv.NeedDocker(t)
	// Publishing a port and creating a network make Docker add rules to the
	// host's namespace: not while another test snapshots them.
	testenv.LockDaemons(t)
	testenv.GuardRootRules(t)
	image := testenv.BusyboxImage(t)
	const subnet, gateway = "198.18.214.0/24", "198.18.214.1"

	network := testenv.RandomName("cnt-ports-")
	if _, err := testenv.Docker("network", "create", "--subnet", subnet, "--gateway", gateway,
		"--label", testenv.TestLabel, network); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if _, err := testenv.Docker("network", "rm", network); err != nil {
			t.Errorf("removing network: %v", err)
		}
	})
	id := testenv.RunContainer(t, "--network", network, "-p", gateway+"::8080", image, "httpd", "-f", "-p", "8080", "-h", "/tmp")
	hostPort := docker(t, "port", id, "8080/tcp")
	ep, err := netip.ParseAddrPort(strings.TrimSpace(strings.Split(hostPort, "\n")[0]))
	if err != nil || ep.Addr() != netip.MustParseAddr(gateway) {
		t.Fatalf("docker port = %q (%v); want %s:<port>", hostPort, err, gateway)
	}
	ip := netip.MustParseAddr(docker(t, "inspect", "-f", "{{(index .NetworkSettings.Networks \""+network+"\").IPAddress}}", id))

	client, err := NewClient("")
	if err != nil {
		t.Fatal(err)
	}
	logger, _ := newLogger(t)
	p := NewPortTable(client, logger)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ds, ok, err := p.Lookup(ctx, ep)
	netID := docker(t, "network", "inspect", "-f", "{{.Id}}", network)
	want := []Direct{{Addr: netip.AddrPortFrom(ip, 8080), Subnet: netip.MustParsePrefix(subnet), Container: short(id), Network: netID, ICC: true}}
	if err != nil || !ok || !slices.Equal(ds, want) {
		t.Fatalf("Lookup(%s) = %v, %v, %v; want %v", ep, ds, ok, err, want)
	}
	if !netip.MustParsePrefix(subnet).Contains(ip) {
		t.Errorf("container address %s outside %s", ip, subnet)
	}

	if err := testenv.RemoveContainers(id); err != nil {
		t.Fatal(err)
	}
	p.Invalidate()
	if ds, ok, err := p.Lookup(ctx, ep); err != nil || ok {
		t.Errorf("after removal: Lookup(%s) = %v, %v, %v; want not published", ep, ds, ok, err)
	}
}

// Cached never waits for a listing once there is one, and Refresh brings
// it up to date.
func TestPortTableCached(t *testing.T) {
	f := newFakeEngine()
	id := f.add("web", "", nil)
	f.publish(t, id, map[string][]string{"app": {"198.18.214.5/24"}}, "0.0.0.0:32768->80/tcp")
	p, _, _ := newFakePortTable(t, f)
	ctx := context.Background()
	ep := netip.MustParseAddrPort("192.0.2.10:32768")
	cached := func() string {
		t.Helper()
		ds, ok, err := p.Cached(ctx, ep)
		if err != nil {
			t.Fatal(err)
		}
		return directs(ds, ok)
	}
	want := "[198.18.214.5:80 198.18.214.0/24 " + id[:12] + "]"
	if got := cached(); got != want {
		t.Fatalf("first Cached = %s; want web's address (it lists when there is no listing)", got)
	}
	n := f.listCount()
	f.remove(id)
	p.Invalidate()
	if got := cached(); got != want || f.listCount() != n {
		t.Errorf("Cached after Invalidate = %s with %d more listings; want the old answer and no listing", got, f.listCount()-n)
	}
	if err := p.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	if got := cached(); got != "not published" {
		t.Errorf("Cached after Refresh = %s; want not published", got)
	}
}

// netEngine is a fakeEngine that also lists networks.
type netEngine struct {
	*fakeEngine
	nets []dockerapi.Network
	err  error
}

func (n *netEngine) ListNetworks() ([]dockerapi.Network, error) { return n.nets, n.err }

// A published port's direct address says whether its network lets
// containers reach each other: a bridge does unless enable_icc is false;
// an unknown driver, an unknown network or a failed listing says no.
func TestPortTableICC(t *testing.T) {
	f := newFakeEngine()
	ids := map[string]string{}
	for i, name := range []string{"open", "closed", "macvlan", "gone"} {
		id := f.add(name, "", nil)
		ids[name] = id
		f.publish(t, id, map[string][]string{name: {fmt.Sprintf("198.18.215.%d/24", i+2)}}, fmt.Sprintf("0.0.0.0:%d->80/tcp", 32768+i))
		n := f.world[id].NetworkSettings.Networks[name]
		n.NetworkID = "net-" + name
		f.world[id].NetworkSettings.Networks[name] = n
	}
	ne := &netEngine{fakeEngine: f, nets: []dockerapi.Network{
		{ID: "net-open", Driver: "bridge"},
		{ID: "net-closed", Driver: "bridge", Options: map[string]string{iccOption: "false"}},
		{ID: "net-macvlan", Driver: "macvlan"},
	}}
	logger, _ := newLogger(t)
	p := newPortTable(ne, logger)
	hosts := &hostAddrs{}
	hosts.set("192.0.2.10")
	p.hostAddrs = hosts.get
	ctx := context.Background()
	for i, tc := range []struct {
		name string
		icc  bool
	}{{"open", true}, {"closed", false}, {"macvlan", false}, {"gone", false}} {
		ds, ok, err := p.Lookup(ctx, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.10"), uint16(32768+i)))
		if err != nil || !ok || len(ds) != 1 {
			t.Fatalf("%s: Lookup = %v, %v, %v", tc.name, ds, ok, err)
		}
		if ds[0].Network != "net-"+tc.name || ds[0].ICC != tc.icc {
			t.Errorf("%s: %+v; want network net-%s, ICC %v", tc.name, ds[0], tc.name, tc.icc)
		}
	}

	ne.err = errors.New("engine says no")
	p.Invalidate()
	ds, _, err := p.Lookup(ctx, netip.MustParseAddrPort("192.0.2.10:32768"))
	if err != nil || len(ds) != 1 || ds[0].ICC {
		t.Errorf("with the network listing failing: %+v, %v; want ICC false", ds, err)
	}
}
