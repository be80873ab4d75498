package e2e

// The socket path writes an endpoint only where the client's namespace can
// connect to it, and decides off the set-up (issue 19, sections 2 and 3).
// Each test has its own /24 of 198.18.0.0/15: 198.18.186-189.

import (
	"fmt"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
)

// testNetworkOpts is testNetwork with more `docker network create`
// options; not internal, so that a client has a default route (the case a
// route check cannot tell from reachability) and ports can be published.
func testNetworkOpts(t *testing.T, subnet string, opts ...string) (name, gateway string) {
	t.Helper()
	prefix := strings.TrimSuffix(subnet, "0/24")
	gateway = prefix + "1"
	name = testenv.RandomName("cnt-e2e-reach-")
	args := append([]string{"network", "create", "--subnet", subnet, "--gateway", gateway, "--label", testenv.TestLabel}, opts...)
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

// timedGets makes n requests from inside ns, each bounded by the
// client's own 10s, and returns the bodies and the slowest's duration.
func timedGets(t *testing.T, ns, url string, n int) ([]string, time.Duration) {
	t.Helper()
	var bodies []string
	var slowest time.Duration
	for range n {
		start := time.Now()
		body, err := getIn(ns, url)
		took := time.Since(start)
		if err != nil {
			t.Errorf("GET %s after %v: %v", url, took.Round(time.Millisecond), err)
			body = "FAIL"
		}
		bodies = append(bodies, body)
		slowest = max(slowest, took)
	}
	return bodies, slowest
}

// firstServed polls GETs from inside ns until one succeeds and returns how
// long after start it was.
func firstServed(t *testing.T, ns, url string, start time.Time) time.Duration {
	t.Helper()
	var took time.Duration
	eventually(t, 30*time.Second, "the first request served through "+url, func() error {
		_, err := getIn(ns, url)
		took = time.Since(start)
		if err != nil {
			time.Sleep(10 * time.Millisecond)
		}
		return err
	})
	return took
}

// TestSocketReachOtherNetwork: a client on one user network whose
// service's instance is on another network has a route to it (its default
// route) but Docker drops what crosses between bridge networks. The port
// stays on the relay, which serves it at once; a client on the instance's
// own network keeps the socket path.
func TestSocketReachOtherNetwork(t *testing.T) {
	prerequisites(t)
	netA, gwA := testNetworkOpts(t, "198.18.186.0/24")
	netB, _ := testNetworkOpts(t, "198.18.187.0/24")
	httpdBackend(t, netA, "198.18.186.10", "be6")
	dns := testenv.Dnsmasq(t, []testenv.SRV{{Name: "web.service.test", Target: "be6.node.test", Port: 8080, Priority: 1, Weight: 10}},
		map[string][]string{"be6.node.test": {"198.18.186.10"}})
	d := startSocketDaemon(t, dns)
	url := "http://127.0.0.1:6000" + ipPath

	start := time.Now()
	far := container(t, "--network", netB, "--ip", "198.18.187.20", "-l", "connect.6000=web.service.test")
	farNS := netnsOf(t, far)
	first := firstServed(t, farNS, url, start)
	p := waitPath(t, d, far, 6000, "relay", "ipv4")["ipv4"]
	if !strings.Contains(p.Why, "cannot connect to endpoint 198.18.186.10:8080") {
		t.Errorf("/status for the client on the other network: relay because %q; want it to say the namespace cannot connect to the endpoint", p.Why)
	}
	bodies, slowest := timedGets(t, farNS, url, 10)
	// Relayed from the host's namespace: the backend sees network A's
	// gateway.
	wantServedBy(t, "the client on the other network", bodies, "be6", gwA)
	if slowest >= 3*time.Second {
		t.Errorf("the slowest of 10 requests took %v: a connect hung in SYN retries", slowest)
	}
	t.Logf("client on the other network: first request served %v after docker run began; 10 requests on the relay, the slowest %v",
		first.Round(time.Millisecond), slowest.Round(time.Millisecond))

	near := container(t, "--network", netA, "--ip", "198.18.186.20", "-l", "connect.6000=web.service.test")
	if p := waitPath(t, d, near, 6000, "socket", "ipv4")["ipv4"]; !slices.Equal(p.Endpoints, []string{"198.18.186.10:8080"}) {
		t.Errorf("/status for the client on the instance's network: endpoints %v; want [198.18.186.10:8080]", p.Endpoints)
	}
	nearBodies, _ := timedGets(t, netnsOf(t, near), url, 5)
	wantServedBy(t, "the client on the instance's network", nearBodies, "be6", "198.18.186.20")
	// The far client's verdict did not take the endpoint from the near one.
	if p := waitPath(t, d, far, 6000, "relay", "ipv4")["ipv4"]; p.Path != "relay" {
		t.Errorf("the far client moved to %s", p.Path)
	}
}

// TestSocketReachICCOff: on a network created with enable_icc=false, a
// client cannot reach its neighbour's own address. The service's endpoint
// is the neighbour's published port: it is not translated to the
// container's address (which would leave the port to the relay, after a
// failed reach check) but written as published, and the client is served
// without a hang.
func TestSocketReachICCOff(t *testing.T) {
	prerequisites(t)
	network, gateway := testNetworkOpts(t, "198.18.188.0/24", "-o", "com.docker.network.bridge.enable_icc=false")
	be := httpdBackend(t, network, "198.18.188.10", "be7", "-p", gateway+"::8080")
	bound := strings.TrimSpace(testenv.Run(t, "docker", "port", be, "8080/tcp"))
	hostPort, err := netipPort(bound, gateway)
	if err != nil {
		t.Fatalf("docker port %.12s 8080/tcp = %q: %v", be, bound, err)
	}
	published := net.JoinHostPort(gateway, fmt.Sprint(hostPort))
	dns := testenv.Dnsmasq(t, []testenv.SRV{{Name: "web.service.test", Target: "gw.node.test", Port: hostPort, Priority: 1, Weight: 10}},
		map[string][]string{"gw.node.test": {gateway}})
	d := startSocketDaemon(t, dns)
	url := "http://127.0.0.1:6000" + ipPath

	start := time.Now()
	client := container(t, "--network", network, "--ip", "198.18.188.20", "-l", "connect.6000=web.service.test")
	ns := netnsOf(t, client)
	first := firstServed(t, ns, url, start)
	var p struct{ path, why string }
	eventually(t, 30*time.Second, "port 6000 decided", func() error {
		rp, err := routePath(status(t, d), client, 6000, "ipv4")
		if err == nil && strings.HasPrefix(rp.Why, "deciding") {
			err = fmt.Errorf("not decided yet")
		}
		if err == nil && slices.Contains(rp.Endpoints, "198.18.188.10:8080") {
			t.Fatalf("/status: endpoints %v; the published port was translated to the container's own address on a network without ICC", rp.Endpoints)
		}
		// The published port itself answers the client (the engine's
		// proxy): the socket path sends it there.
		if err == nil && (rp.Path != "socket" || !slices.Equal(rp.Endpoints, []string{published})) {
			err = fmt.Errorf("%s path (%s), endpoints %v; want the socket path with [%s]", rp.Path, rp.Why, rp.Endpoints, published)
		}
		p.path, p.why = rp.Path, rp.Why
		return err
	})
	bodies, slowest := timedGets(t, ns, url, 10)
	for i, b := range bodies {
		if !strings.HasPrefix(b, "be7 ") {
			t.Errorf("request %d: %q; want be7's answer", i, b)
		}
	}
	if slowest >= 3*time.Second {
		t.Errorf("the slowest of 10 requests took %v: a connect hung in SYN retries", slowest)
	}
	t.Logf("enable_icc=false: port 6000 on the %s path (%s); first request %v after docker run began; 10 requests, the slowest %v",
		p.path, p.why, first.Round(time.Millisecond), slowest.Round(time.Millisecond))
}

// TestSocketSlowNameSetUp: a container labelled with a good service and two
// names whose DNS server never answers is served on its good port as soon
// as the set-up allows: the socket path decides the good port while the
// slow lookups are pending, and the relay beneath waits for none of them.
func TestSocketSlowNameSetUp(t *testing.T) {
	prerequisites(t)
	network, _ := testNetworkOpts(t, "198.18.189.0/24")
	httpdBackend(t, network, "198.18.189.10", "be8")
	// A DNS server that reads queries and never answers, for dnsmasq to
	// forward the slow zone to.
	hole, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { hole.Close() })
	srvs := []testenv.SRV{{Name: "web.service.test", Target: "be8.node.test", Port: 8080, Priority: 1, Weight: 10}}
	args := append(testenv.Records(srvs, map[string][]string{"be8.node.test": {"198.18.189.10"}}),
		"--server=/slow.test/"+strings.Replace(hole.LocalAddr().String(), ":", "#", 1))
	dns := testenv.StartDnsmasq(t, 0, args...).Addr
	d := startSocketDaemon(t, dns)

	start := time.Now()
	client := container(t, "--network", network, "--ip", "198.18.189.20",
		"-l", "connect.6000=web.service.test", "-l", "connect.6001=one.slow.test", "-l", "connect.6002=two.slow.test")
	ns := netnsOf(t, client)
	first := firstServed(t, ns, "http://127.0.0.1:6000"+ipPath, start)
	waitPath(t, d, client, 6000, "socket", "ipv4")
	onSocket := time.Since(start)
	st := status(t, d)
	slowPending := 0
	for _, port := range []uint16{6001, 6002} {
		rp, err := routePath(st, client, port, "ipv4")
		if err != nil {
			t.Fatal(err)
		}
		if rp.Path != "relay" {
			t.Errorf("port %d of a name that never resolves: %s; want the relay", port, rp.Path)
		}
		if strings.HasPrefix(rp.Why, "deciding") {
			slowPending++
		}
	}
	wantServedBy(t, "the good port", fetchMany(t, client, "http://127.0.0.1:6000"+ipPath, 5), "be8", "198.18.189.20")
	t.Logf("from docker run: first request on the good port served after %v, /status said socket after %v; slow lookups still pending then: %d of 2",
		first.Round(time.Millisecond), onSocket.Round(time.Millisecond), slowPending)
}
