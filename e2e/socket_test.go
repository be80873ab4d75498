package e2e

// The socket data path (issue 14) end to end: a real daemon with
// --datapath socket, its programs attached to the machine's cgroup2 root,
// pinning on a bpffs of the test's own (bpfDir), and real containers on a
// Docker network each test creates. These tests pass --datapath socket
// themselves, whatever the suite's data path.
//
// Each test has its own /24 of the benchmarking range 198.18.0.0/15, used
// nowhere else in the repository: 198.18.181-185. Backends get .10 and
// .11, clients .20 and .21.

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/connectable/connectable/admin"
	"github.com/connectable/connectable/internal/testenv"
	"github.com/connectable/connectable/sockpath"
)

// testNetwork creates a labelled bridge network on subnet, a /24 whose
// gateway is .1, and removes it when the test ends, after the containers
// on it (cleanups run last-in first-out). internal keeps the rules Docker
// adds to the host's namespace to the minimum; a network that publishes
// ports cannot be internal. prerequisites' guard proves the host's rules
// are as they were afterwards.
func testNetwork(t *testing.T, subnet string, internal bool) (name, gateway string) {
	t.Helper()
	prefix := strings.TrimSuffix(subnet, "0/24")
	if prefix == subnet {
		t.Fatalf("testNetwork wants a /24 ending in .0, got %s", subnet)
	}
	gateway = prefix + "1"
	name = testenv.RandomName("cnt-e2e-sock-")
	args := []string{"network", "create", "--subnet", subnet, "--gateway", gateway, "--label", testenv.TestLabel}
	if internal {
		args = append(args, "--internal")
	}
	if _, err := testenv.Docker(append(args, name)...); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if _, err := testenv.Docker("network", "rm", name); err != nil {
			t.Errorf("removing network %s: %v", name, err)
		}
	})
	return name, gateway
}

// httpdScript serves /cgi-bin/ip with busybox httpd on port 8080: the
// backend's name and the client's address as the backend sees it
// (REMOTE_ADDR), so that a test tells a direct connection from one through
// a proxy.
const httpdScript = `mkdir -p /www/cgi-bin
cat > /www/cgi-bin/ip <<'EOF'
#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n%%s %%s\n' '%s' "$REMOTE_ADDR"
EOF
chmod +x /www/cgi-bin/ip
exec httpd -f -p 8080 -h /www
`

// httpdBackend starts a labelled (connectable.test=1, no connect label)
// busybox httpd container named by name on network at ip; extra are more
// docker run options.
func httpdBackend(t *testing.T, network, ip, name string, extra ...string) string {
	t.Helper()
	image := testenv.BusyboxImage(t)
	args := append([]string{"--network", network, "--ip", ip}, extra...)
	return testenv.RunContainer(t, append(args, image, "sh", "-c", fmt.Sprintf(httpdScript, name))...)
}

// ipPath is the backends' page that names them and their client.
const ipPath = "/cgi-bin/ip"

// routePath returns how the daemon's /status says it serves the
// container's port for family (ipv4 or ipv6).
func routePath(st admin.Status, id string, port uint16, family string) (admin.RoutePath, error) {
	ns := findNamespace(st, id)
	if ns == nil {
		return admin.RoutePath{}, fmt.Errorf("container %.12s not in /status", id)
	}
	for _, r := range ns.Routes {
		if r.Port != port {
			continue
		}
		for _, p := range r.Paths {
			if p.Family == family {
				return p, nil
			}
		}
		return admin.RoutePath{}, fmt.Errorf("port %d of %.12s has no %s path in /status: %+v", port, id, family, r.Paths)
	}
	return admin.RoutePath{}, fmt.Errorf("port %d of %.12s not in /status", port, id)
}

// waitPath waits until /status says path serves the container's port for
// each family, decided: a port is on the relay while it is being decided.
func waitPath(t *testing.T, d *daemon, id string, port uint16, path string, families ...string) map[string]admin.RoutePath {
	t.Helper()
	out := map[string]admin.RoutePath{}
	eventually(t, 30*time.Second, fmt.Sprintf("/status: port %d of %.12s on the %s path", port, id, path), func() error {
		st := status(t, d)
		for _, f := range families {
			p, err := routePath(st, id, port, f)
			if err != nil {
				return err
			}
			if p.Path != path || strings.HasPrefix(p.Why, "deciding") {
				return fmt.Errorf("%s: path %s (%s)", f, p.Path, p.Why)
			}
			out[f] = p
		}
		return nil
	})
	return out
}

// sumSeries adds up the samples of a metric whose labels include every
// one of labels (`name="value"`), and -1 if there is none.
func sumSeries(page, metric string, labels ...string) float64 {
	sum, found := 0.0, false
	sc := bufio.NewScanner(strings.NewReader(page))
next:
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, metric+"{") && !strings.HasPrefix(line, metric+" ") {
			continue
		}
		for _, l := range labels {
			if !strings.Contains(line, l) {
				continue next
			}
		}
		var v float64
		if _, err := fmt.Sscan(line[strings.LastIndexByte(line, ' ')+1:], &v); err == nil {
			sum, found = sum+v, true
		}
	}
	if !found {
		return -1
	}
	return sum
}

func mustScrape(t *testing.T, d *daemon) string {
	t.Helper()
	page, err := scrape(d.admin)
	if err != nil {
		t.Fatalf("/metrics: %v", err)
	}
	return page
}

// served returns a backend's answer as "name address", the address in
// its plain form: busybox httpd, listening on [::], gives an IPv4 client
// as [::ffff:a.b.c.d].
func served(body string) string {
	name, addr, ok := strings.Cut(strings.TrimSpace(body), " ")
	if !ok {
		return body
	}
	a, err := netip.ParseAddr(strings.Trim(addr, "[]"))
	if err != nil {
		return body
	}
	return name + " " + a.Unmap().String()
}

// wantServedBy checks that every body names the backend and the address
// it saw the request from.
func wantServedBy(t *testing.T, what string, bodies []string, backend, from string) {
	t.Helper()
	for i, b := range bodies {
		if served(b) != backend+" "+from {
			t.Errorf("%s, request %d: got %q; want %q (the backend seeing %s)", what, i, b, backend+" "+from, from)
		}
	}
}

// TestSocketDirect: a client container on the backend's network is served
// straight by the kernel. The backend sees the client's own address (no
// proxy between them), /status says socket for IPv4, the kernel counts the
// connects, the relay accepts none of them, and the client's getpeername
// still shows localhost:6000. [::1] is the relay's: the endpoint is IPv4,
// and an IPv6 table holds only IPv6 endpoints.
func TestSocketDirect(t *testing.T) {
	prerequisites(t)
	network, gateway := testNetwork(t, "198.18.181.0/24", true)
	httpdBackend(t, network, "198.18.181.10", "be1")
	dns := testenv.Dnsmasq(t, []testenv.SRV{{Name: "web.service.test", Target: "be1.node.test", Port: 8080, Priority: 1, Weight: 10}},
		map[string][]string{"be1.node.test": {"198.18.181.10"}})
	d := startSocketDaemon(t, dns)
	const clientIP = "198.18.181.20"
	client := container(t, "--network", network, "--ip", clientIP, "--sysctl", "net.ipv6.conf.all.disable_ipv6=0",
		"-l", "connect.6000=web.service.test")

	if p := waitPath(t, d, client, 6000, "socket", "ipv4")["ipv4"]; !slices.Equal(p.Endpoints, []string{"198.18.181.10:8080"}) {
		t.Errorf("/status, ipv4: socket path endpoints %v; want [198.18.181.10:8080]", p.Endpoints)
	}
	if p := waitPath(t, d, client, 6000, "relay", "ipv6")["ipv6"]; !strings.Contains(p.Why, "is IPv4") {
		t.Errorf("/status, ipv6: relay because %q; want it to say the endpoint is IPv4", p.Why)
	}
	eventually(t, 30*time.Second, "the backend answers", func() error {
		_, err := fetch(t, client, "http://localhost:6000"+ipPath)
		return err
	})
	before := mustScrape(t, d)
	relayBefore := sumSeries(before, "connectable_connections_accepted_total", `service="web.service.test"`)
	kernelBefore := max(0, sumSeries(before, "connectable_socket_connects_total", `service="web.service.test"`, `endpoint="198.18.181.10:8080"`))

	const n = 10
	wantServedBy(t, "127.0.0.1:6000", fetchMany(t, client, "http://127.0.0.1:6000"+ipPath, n), "be1", clientIP)

	// The client's socket, as the client sees it: connected to what it
	// asked for.
	c, err := dialIn(netnsOf(t, client), "127.0.0.1:6000", 5*time.Second)
	if err != nil {
		t.Fatalf("dialling localhost:6000 in the client: %v", err)
	}
	defer c.Close()
	if got := c.RemoteAddr().String(); got != "127.0.0.1:6000" {
		t.Errorf("getpeername in the client = %s; want 127.0.0.1:6000", got)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(c, "GET %s HTTP/1.0\r\n\r\n", ipPath)
	resp, _ := bufio.NewReader(c).ReadString(0)
	_, body, _ := strings.Cut(resp, "\r\n\r\n")
	if served(body) != "be1 "+clientIP {
		t.Errorf("the request on that socket got:\n%s\nwant it to end in %q", resp, "be1 "+clientIP)
	}
	c.Close()

	after := mustScrape(t, d)
	if v := sumSeries(after, "connectable_connections_accepted_total", `service="web.service.test"`); max(v, 0) != max(relayBefore, 0) {
		t.Errorf("the relay's connections_accepted_total for the service went from %v to %v; want no change: the kernel served them", relayBefore, v)
	}
	kernel := sumSeries(after, "connectable_socket_connects_total", `service="web.service.test"`, `endpoint="198.18.181.10:8080"`)
	if kernel-kernelBefore < n+1 {
		t.Errorf("connectable_socket_connects_total went from %v to %v after %d connects; want ≥ %d more", kernelBefore, kernel, n+1, n+1)
	}
	// Relayed from the host's namespace: the backend sees the gateway.
	wantServedBy(t, "[::1]:6000", fetchMany(t, client, "http://[::1]:6000"+ipPath, n), "be1", gateway)
	if v := sumSeries(mustScrape(t, d), "connectable_connections_accepted_total", `service="web.service.test"`); v-max(0, relayBefore) < n {
		t.Errorf("the relay's connections_accepted_total went from %v to %v after %d requests to [::1]; want ≥ %d more", relayBefore, v, n, n)
	}
	if v := sumSeries(after, "connectable_socket_ports", `path="socket"`); v < 1 {
		t.Errorf(`connectable_socket_ports{path="socket"} = %v; want ≥ 1 (the port, IPv4)`, v)
	}
	t.Logf("kernel connects %v → %v; relay accepted %v", kernelBefore, kernel, relayBefore)
}

// TestSocketPublishedPort: the service's endpoint is a port the backend
// publishes on the network's gateway (-p gateway::8080, a random host
// port). A client on the same network is sent to the container's own
// address and port: the backend sees the client's address, where
// docker-proxy would show the gateway's.
func TestSocketPublishedPort(t *testing.T) {
	prerequisites(t)
	network, gateway := testNetwork(t, "198.18.182.0/24", false)
	be := httpdBackend(t, network, "198.18.182.10", "be2", "-p", gateway+"::8080")
	bound := strings.TrimSpace(testenv.Run(t, "docker", "port", be, "8080/tcp"))
	hostPort, err := netipPort(bound, gateway)
	if err != nil {
		t.Fatalf("docker port %.12s 8080/tcp = %q: %v", be, bound, err)
	}
	published := fmt.Sprintf("%s:%d", gateway, hostPort)

	// The control: from the host, through the published port, the backend
	// sees the gateway, so the check below tells the two ways apart.
	eventually(t, 30*time.Second, "the published port answers the host", func() error {
		code, body, err := get(published, ipPath)
		if err == nil && (code != 200 || served(body) != "be2 "+gateway) {
			err = fmt.Errorf("%d %q; want be2 %s", code, body, gateway)
		}
		return err
	})

	dns := testenv.Dnsmasq(t, []testenv.SRV{{Name: "web.service.test", Target: "gw.node.test", Port: hostPort, Priority: 1, Weight: 10}},
		map[string][]string{"gw.node.test": {gateway}})
	d := startSocketDaemon(t, dns)
	const clientIP = "198.18.182.20"
	client := container(t, "--network", network, "--ip", clientIP, "-l", "connect.6000=web.service.test")
	p := waitPath(t, d, client, 6000, "socket", "ipv4")["ipv4"]
	if !slices.Equal(p.Endpoints, []string{"198.18.182.10:8080"}) {
		t.Errorf("/status: socket path endpoints %v; want the container's own [198.18.182.10:8080] for %s", p.Endpoints, published)
	}
	eventually(t, 30*time.Second, "the backend answers the client", func() error {
		_, err := fetch(t, client, "http://localhost:6000"+ipPath)
		return err
	})
	relayBefore := sumSeries(mustScrape(t, d), "connectable_connections_accepted_total", `service="web.service.test"`)
	wantServedBy(t, "localhost:6000", fetchMany(t, client, "http://localhost:6000"+ipPath, 10), "be2", clientIP)
	page := mustScrape(t, d)
	if v := sumSeries(page, "connectable_connections_accepted_total", `service="web.service.test"`); v != relayBefore {
		t.Errorf("the relay's connections_accepted_total went from %v to %v; want no change", relayBefore, v)
	}
	if v := sumSeries(page, "connectable_socket_connects_total", `service="web.service.test"`, `endpoint="198.18.182.10:8080"`); v < 10 {
		t.Errorf("connectable_socket_connects_total for 198.18.182.10:8080 = %v; want ≥ 10", v)
	}
}

// netipPort returns the port of `docker port` output bound on host.
func netipPort(out, host string) (uint16, error) {
	for _, line := range strings.Split(out, "\n") {
		h, p, err := net.SplitHostPort(strings.TrimSpace(line))
		if err != nil || h != host {
			continue
		}
		var port uint16
		if _, err := fmt.Sscan(p, &port); err == nil && port != 0 {
			return port, nil
		}
	}
	return 0, fmt.Errorf("no binding on %s", host)
}

// TestSocketFallback: in socket mode, what the kernel cannot send straight
// is relayed. A --network none client has no route to the backend's
// network; a bridge client's service is on the host's loopback, which its
// namespace cannot reach. /status says relay with the reason; the relay
// counts the connections and the kernel none.
func TestSocketFallback(t *testing.T) {
	prerequisites(t)
	network, gateway := testNetwork(t, "198.18.183.0/24", true)
	httpdBackend(t, network, "198.18.183.10", "be3")
	loop := startBackend(t, "loop")
	srvs, hosts := service("loop.service.test", loop)
	srvs = append(srvs, testenv.SRV{Name: "web.service.test", Target: "be3.node.test", Port: 8080, Priority: 1, Weight: 10})
	hosts["be3.node.test"] = []string{"198.18.183.10"}
	d := startSocketDaemon(t, testenv.Dnsmasq(t, srvs, hosts), "--allow-targets", "127.0.0.0/8")
	none := container(t, "--network", "none", "-l", "connect.6000=web.service.test")
	bridged := container(t, "--network", network, "--ip", "198.18.183.20", "-l", "connect.6001=loop.service.test")

	for _, tc := range []struct {
		id, what, why string
		port          uint16
	}{
		{none, "--network none", "no route to endpoint 198.18.183.10:8080", 6000},
		{bridged, "host loopback backend", "on the host's loopback", 6001},
	} {
		p := waitPath(t, d, tc.id, tc.port, "relay", "ipv4")["ipv4"]
		if !strings.Contains(p.Why, tc.why) {
			t.Errorf("%s: /status gives the reason %q; want it to say %q", tc.what, p.Why, tc.why)
		}
	}
	eventually(t, 30*time.Second, "the relay serves the --network none client", func() error {
		_, err := fetch(t, none, "http://localhost:6000"+ipPath)
		return err
	})
	// Relayed from the host's namespace: the backend sees the gateway.
	wantServedBy(t, "--network none", fetchMany(t, none, "http://localhost:6000"+ipPath, 5), "be3", gateway)
	eventually(t, 30*time.Second, "the relay serves the host loopback backend", func() error {
		got, err := fetch(t, bridged, "http://localhost:6001/")
		if err == nil && got != "loop" {
			err = fmt.Errorf("got %q", got)
		}
		return err
	})
	page := mustScrape(t, d)
	for _, svc := range []string{"web.service.test", "loop.service.test"} {
		if v := sumSeries(page, "connectable_connections_accepted_total", `service="`+svc+`"`); v < 1 {
			t.Errorf("the relay's connections_accepted_total for %s = %v; want ≥ 1", svc, v)
		}
		if v := sumSeries(page, "connectable_socket_connects_total", `service="`+svc+`"`); v > 0 {
			t.Errorf("connectable_socket_connects_total for %s = %v; want none", svc, v)
		}
	}
	if v := sumSeries(page, "connectable_socket_ports", `path="relay"`); v < 2 {
		t.Errorf(`connectable_socket_ports{path="relay"} = %v; want ≥ 2`, v)
	}
}

// pinnedRoute is one key of the pinned routes map: struct route_key of
// sockpath/bpf/sockpath.c.
type pinnedRoute struct {
	cookie uint64
	port   uint16
	family uint8
}

func (r pinnedRoute) String() string {
	return fmt.Sprintf("cookie %d port %d family %d", r.cookie, r.port, r.family)
}

// pinnedRoutes reads the routes map a daemon pinned in dir, as the next
// daemon would adopt it.
func pinnedRoutes(t *testing.T, dir string) []pinnedRoute {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(dir, "routes"), nil)
	if err != nil {
		t.Fatalf("opening the pinned routes map: %v", err)
	}
	defer m.Close()
	if m.KeySize() != 16 {
		t.Fatalf("the routes map's keys are %d bytes; this test reads the 16 of cookie u64, port u16, family u8, pad[5]", m.KeySize())
	}
	var out []pinnedRoute
	var key [16]byte
	var table uint32
	it := m.Iterate()
	for it.Next(&key, &table) {
		out = append(out, pinnedRoute{
			cookie: nativeUint64(key[0:8]),
			port:   uint16(nativeUint64(key[8:10])),
			family: key[10],
		})
	}
	if err := it.Err(); err != nil {
		t.Fatalf("iterating the pinned routes map: %v", err)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].String() < out[j].String() })
	return out
}

// nativeUint64 decodes a little-endian integer: the socket path's
// programs are built for bpfel (sockpath/kern_bpfel.go) only.
func nativeUint64(b []byte) uint64 {
	var v uint64
	for i := len(b) - 1; i >= 0; i-- {
		v = v<<8 | uint64(b[i])
	}
	return v
}

// netnsCookie returns the kernel's cookie of the namespace at ns, the key
// the socket path's maps use for it.
func netnsCookie(t *testing.T, ns string) uint64 {
	t.Helper()
	cookie, err := sockpath.NetNSCookie(ns)
	if err != nil {
		t.Fatal(err)
	}
	return cookie
}

// wantRoutes are the IPv4 routes of each port of a namespace: the tests'
// endpoints are IPv4, so [::1] is the relay's.
func wantRoutes(cookie uint64, ports ...uint16) []pinnedRoute {
	var out []pinnedRoute
	for _, p := range ports {
		out = append(out, pinnedRoute{cookie, p, unix.AF_INET})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].String() < out[j].String() })
	return out
}

// TestSocketKillRestart: SIGKILL leaves the programs and their entries
// serving with no daemon (the relay is dead with it); a client container
// removed meanwhile leaves entries behind, which the next daemon, adopting
// the pins, sweeps; SIGTERM then cleanup removes everything it pinned.
func TestSocketKillRestart(t *testing.T) {
	prerequisites(t)
	network, _ := testNetwork(t, "198.18.184.0/24", true)
	httpdBackend(t, network, "198.18.184.10", "be4")
	dns := testenv.Dnsmasq(t, []testenv.SRV{{Name: "web.service.test", Target: "be4.node.test", Port: 8080, Priority: 1, Weight: 10}},
		map[string][]string{"be4.node.test": {"198.18.184.10"}})
	d := startSocketDaemon(t, dns)
	dir := bpfDir(t)
	a := container(t, "--network", network, "--ip", "198.18.184.20", "-l", "connect.6000=web.service.test", "-l", "connect.6001=web.service.test")
	b := container(t, "--network", network, "--ip", "198.18.184.21", "-l", "connect.6000=web.service.test")
	cookieA, cookieB := netnsCookie(t, netnsOf(t, a)), netnsCookie(t, netnsOf(t, b))
	waitPath(t, d, a, 6000, "socket", "ipv4")
	waitPath(t, d, a, 6001, "socket", "ipv4")
	waitPath(t, d, b, 6000, "socket", "ipv4")
	both := wantRoutes(cookieA, 6000, 6001)
	both = append(both, wantRoutes(cookieB, 6000)...)
	sort.Slice(both, func(i, j int) bool { return both[i].String() < both[j].String() })
	if got := pinnedRoutes(t, dir); !slices.Equal(got, both) {
		t.Fatalf("pinned routes with both clients: %v; want %v", got, both)
	}
	eventually(t, 30*time.Second, "the backend answers", func() error {
		_, err := fetch(t, a, "http://localhost:6000"+ipPath)
		return err
	})

	d.stop(syscall.SIGKILL)
	// With the daemon, its relay is gone: only the kernel can serve these,
	// and the backend seeing the client's own address says it did.
	wantServedBy(t, "6000 with the daemon dead", fetchMany(t, a, "http://localhost:6000"+ipPath, 5), "be4", "198.18.184.20")
	wantServedBy(t, "6001 with the daemon dead", fetchMany(t, a, "http://localhost:6001"+ipPath, 5), "be4", "198.18.184.20")
	if err := testenv.RemoveContainers(b); err != nil {
		t.Fatal(err)
	}
	if got := pinnedRoutes(t, dir); !slices.Equal(got, both) {
		t.Errorf("pinned routes with no daemon: %v; want what it left, %v", got, both)
	}

	d = startSocketDaemon(t, dns)
	want := wantRoutes(cookieA, 6000, 6001)
	eventually(t, 30*time.Second, "the new daemon sweeps the removed client's routes", func() error {
		if got := pinnedRoutes(t, dir); !slices.Equal(got, want) {
			return fmt.Errorf("pinned routes %v; want %v", got, want)
		}
		return nil
	})
	if !d.waitLog("adopted the socket path of a previous run", 5*time.Second) {
		t.Errorf("the new daemon did not log adopting the pins")
	}
	waitPath(t, d, a, 6000, "socket", "ipv4")
	wantServedBy(t, "after the restart", fetchMany(t, a, "http://localhost:6000"+ipPath, 5), "be4", "198.18.184.20")
	// Settled: a resync later, still exactly those.
	time.Sleep(3 * time.Second)
	if got := pinnedRoutes(t, dir); !slices.Equal(got, want) {
		t.Errorf("pinned routes after a resync: %v; want %v", got, want)
	}

	if code := d.stop(syscall.SIGTERM); code != 0 {
		t.Errorf("exit code after SIGTERM = %d, want 0", code)
	}
	// SIGTERM leaves the socket path serving for the next start; cleanup
	// removes it.
	if out, err := exec.Command(binary, "cleanup", "--bpf-dir", dir).CombinedOutput(); err != nil {
		t.Errorf("connectable cleanup: %v: %s", err, out)
	}
	ents, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("reading %s: %v", dir, err)
	}
	if len(ents) > 0 {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Errorf("left in %s after SIGTERM and cleanup: %v", dir, names)
	}
}

// outcome is one request of TestSocketInstanceKilled's load.
type outcome struct {
	start, end time.Time
	body       string
	err        error
}

// TestSocketInstanceKilled: one of a service's two backend containers is
// killed under load. The kernel sees the connects to it fail, the daemon
// takes it out of the table, and every request that starts 2 s after the
// kill succeeds; once it runs again, a probe brings it back.
func TestSocketInstanceKilled(t *testing.T) {
	prerequisites(t)
	network, _ := testNetwork(t, "198.18.185.0/24", true)
	httpdBackend(t, network, "198.18.185.10", "be5a")
	victim := httpdBackend(t, network, "198.18.185.11", "be5b")
	dns := testenv.Dnsmasq(t, []testenv.SRV{
		{Name: "web.service.test", Target: "be5a.node.test", Port: 8080, Priority: 1, Weight: 10},
		{Name: "web.service.test", Target: "be5b.node.test", Port: 8080, Priority: 1, Weight: 10},
	}, map[string][]string{"be5a.node.test": {"198.18.185.10"}, "be5b.node.test": {"198.18.185.11"}})
	d := startSocketDaemon(t, dns)
	const clientIP = "198.18.185.20"
	client := container(t, "--network", network, "--ip", clientIP, "-l", "connect.6000=web.service.test")
	ns := netnsOf(t, client)
	p := waitPath(t, d, client, 6000, "socket", "ipv4")["ipv4"]
	if len(p.Endpoints) != 2 {
		t.Fatalf("/status: socket path endpoints %v; want both backends", p.Endpoints)
	}
	url := "http://127.0.0.1:6000" + ipPath
	eventually(t, 30*time.Second, "both backends serve the client", func() error {
		seen := map[string]bool{}
		for range 20 {
			body, err := getIn(ns, url)
			if err != nil {
				return err
			}
			seen[served(body)] = true
		}
		if !seen["be5a "+clientIP] || !seen["be5b "+clientIP] {
			return fmt.Errorf("served: %v", seen)
		}
		return nil
	})

	// Four clients in a loop, from before the kill to 6 s after it.
	var (
		mu       sync.Mutex
		outcomes []outcome
		wg       sync.WaitGroup
	)
	stop := make(chan struct{})
	for range 4 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				o := outcome{start: time.Now()}
				o.body, o.err = getIn(ns, url)
				o.end = time.Now()
				mu.Lock()
				outcomes = append(outcomes, o)
				mu.Unlock()
				if o.err != nil {
					time.Sleep(20 * time.Millisecond)
				}
			}
		})
	}
	time.Sleep(time.Second)
	// Times are from when the kill was asked for: the backend may die
	// before docker kill returns.
	killed := time.Now()
	if _, err := testenv.Docker("kill", victim); err != nil {
		close(stop)
		wg.Wait()
		t.Fatal(err)
	}
	killTook := time.Since(killed)
	time.Sleep(6 * time.Second)
	close(stop)
	wg.Wait()

	var failed, okBefore, okAfter int
	var lastFailStart, lastFailEnd time.Duration = -time.Hour, -time.Hour
	for _, o := range outcomes {
		since := o.start.Sub(killed)
		switch {
		case o.err != nil || !strings.HasSuffix(served(o.body), " "+clientIP):
			failed++
			lastFailStart = max(lastFailStart, since)
			lastFailEnd = max(lastFailEnd, o.end.Sub(killed))
			if since >= 2*time.Second {
				t.Errorf("a request started %v after the kill failed: %q, %v", since.Round(time.Millisecond), o.body, o.err)
			}
		case since < 0:
			okBefore++
		default:
			okAfter++
		}
	}
	okLate := 0
	for _, o := range outcomes {
		if o.err == nil && o.start.Sub(killed) >= 2*time.Second {
			okLate++
		}
	}
	t.Logf("docker kill took %v; %d requests: %d served before the kill, %d after it (%d of them started ≥ 2s after it), %d failed",
		killTook.Round(time.Millisecond), len(outcomes), okBefore, okAfter, okLate, failed)
	if failed > 0 {
		t.Logf("the last failed request started %v after the kill and ended %v after it",
			lastFailStart.Round(time.Millisecond), lastFailEnd.Round(time.Millisecond))
	}
	if okLate < 10 {
		t.Errorf("only %d requests served from 2s after the kill; the load did not run", okLate)
	}
	if lines := d.logs.Lines("endpoint taken out of the socket path", "198.18.185.11:8080"); len(lines) == 0 {
		t.Errorf("the daemon did not log taking 198.18.185.11:8080 out")
	} else {
		t.Logf("daemon: %s", lines[0])
	}

	// Back: the same address, so the probe from the client's namespace
	// reaches it and its slots return.
	if _, err := testenv.Docker("start", victim); err != nil {
		t.Fatal(err)
	}
	eventually(t, 90*time.Second, "the restarted backend serves again", func() error {
		for range 20 {
			if body, err := getIn(ns, url); err == nil && served(body) == "be5b "+clientIP {
				return nil
			}
		}
		return errors.New("not served by be5b in 20 requests")
	})
}
