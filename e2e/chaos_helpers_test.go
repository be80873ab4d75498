package e2e

// Helpers of the chaos tests (issue 8): faults injected into a real daemon,
// real containers, real dnsmasq and real backends, with the daemon's own
// resources (descriptors, goroutines, memory) measured from outside.

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/connectable/connectable/admin"
	"github.com/connectable/connectable/internal/testenv"
	"github.com/connectable/connectable/netns"
)

// netnsOf returns the network namespace path of a running container.
func netnsOf(t *testing.T, id string) string {
	t.Helper()
	return fmt.Sprintf("/proc/%d/ns/net", pid(t, id))
}

// dialIn opens a TCP connection from inside the network namespace at ns, as
// software in the container would: the socket is created there, so the
// container's REDIRECT rules apply to it.
func dialIn(ns, addr string, timeout time.Duration) (net.Conn, error) {
	var c net.Conn
	err := netns.Do(ns, func() error {
		var err error
		c, err = net.DialTimeout("tcp", addr, timeout)
		return err
	})
	return c, err
}

// getIn makes one HTTP GET from inside ns and returns the body.
func getIn(ns, url string) (string, error) {
	client := &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				return dialIn(ns, addr, 5*time.Second)
			},
		},
	}
	resp, err := client.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return strings.TrimSpace(string(body)), err
}

// figures are one daemon's resources at one moment.
type figures struct {
	fds, goroutines int
	sockets         int     // descriptors that are inet sockets: listeners and relayed connections
	rss, heapInuse  float64 // bytes
	namespaces      float64 // connectable_namespaces
	ports           float64 // connectable_ports
}

func (f figures) String() string {
	return fmt.Sprintf("fds %d (inet sockets %d), goroutines %d, RSS %.1f MiB, heap in use %.1f MiB, namespaces %.0f, ports %.0f",
		f.fds, f.sockets, f.goroutines, f.rss/(1<<20), f.heapInuse/(1<<20), f.namespaces, f.ports)
}

// measure reads the daemon's descriptors from /proc and the rest from its
// /metrics. The scrape's own connection is closed before the descriptors
// are counted, and not kept alive, so it does not count.
func measure(t *testing.T, d *daemon) figures {
	t.Helper()
	page, err := scrape(d.admin)
	if err != nil {
		t.Fatalf("scraping /metrics: %v", err)
	}
	f := figures{
		goroutines: int(metric(page, "go_goroutines")),
		rss:        metric(page, "process_resident_memory_bytes"),
		heapInuse:  metric(page, "go_memstats_heap_inuse_bytes"),
		namespaces: metric(page, "connectable_namespaces"),
		ports:      metric(page, "connectable_ports"),
	}
	dir := fmt.Sprintf("/proc/%d/fd", d.cmd.Process.Pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatalf("listing %s: %v", dir, err)
	}
	f.fds = len(ents)
	// Not counted: Unix sockets, the daemon's connections to dockerd, which
	// its HTTP client pools and keeps idle as it sees fit; and connections
	// to the admin endpoint, whose server side of the scrape above closes
	// when the daemon gets to it (a quarter of the time after this count,
	// when measured). The rest (listeners, relayed connections) are what
	// must come back to the baseline.
	skip := unixSocketInodes(t, d.cmd.Process.Pid)
	for inode := range adminConnInodes(t, d) {
		skip[inode] = true
	}
	for _, e := range ents {
		link, err := os.Readlink(dir + "/" + e.Name())
		if err != nil || !strings.HasPrefix(link, "socket:[") {
			continue
		}
		if !skip[strings.TrimSuffix(strings.TrimPrefix(link, "socket:["), "]")] {
			f.sockets++
		}
	}
	return f
}

// unixSocketInodes returns the inodes of the Unix sockets in pid's network
// namespace.
func unixSocketInodes(t *testing.T, pid int) map[string]bool {
	t.Helper()
	inodes := map[string]bool{}
	// Num RefCount Protocol Flags Type St Inode [Path]
	for _, f := range procNetRows(t, pid, "unix", 7) {
		inodes[f[6]] = true
	}
	return inodes
}

// adminConnInodes returns the inodes of the TCP connections (not the
// listener) on the daemon's admin port, in the daemon's network namespace.
func adminConnInodes(t *testing.T, d *daemon) map[string]bool {
	t.Helper()
	_, port, err := net.SplitHostPort(d.admin)
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.Atoi(port)
	if err != nil {
		t.Fatal(err)
	}
	suffix := fmt.Sprintf(":%04X", n)
	inodes := map[string]bool{}
	for _, file := range []string{"tcp", "tcp6"} {
		// sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
		for _, f := range procNetRows(t, d.cmd.Process.Pid, file, 10) {
			if listen := "0A"; strings.HasSuffix(f[1], suffix) && f[3] != listen {
				inodes[f[9]] = true
			}
		}
	}
	return inodes
}

// procNetRows returns the fields of each row of /proc/<pid>/net/<file>
// that has at least n of them; the header is left out.
func procNetRows(t *testing.T, pid int, file string, n int) [][]string {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/%s", pid, file))
	if err != nil {
		t.Fatalf("reading /proc/%d/net/%s: %v", pid, file, err)
	}
	var rows [][]string
	for _, line := range strings.Split(string(data), "\n")[1:] {
		if f := strings.Fields(line); len(f) >= n {
			rows = append(rows, f)
		}
	}
	return rows
}

func scrape(addr string) (string, error) {
	c := http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get("http://" + addr + "/metrics")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// settle waits until the daemon's descriptors and goroutines are at most
// slack above base (the admin endpoint's own connection handling comes and
// goes) and returns the figures then; it fails the test if they never are.
func settle(t *testing.T, d *daemon, base figures, slack int, timeout time.Duration, what string) figures {
	t.Helper()
	var f figures
	deadline := time.Now().Add(timeout)
	for {
		f = measure(t, d)
		if f.fds <= base.fds+slack && f.goroutines <= base.goroutines+slack {
			return f
		}
		if time.Now().After(deadline) {
			t.Errorf("%s: resources did not return to baseline within %v:\nbaseline %v\nnow      %v", what, timeout, base, f)
			return f
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// settleSockets waits until the daemon holds as many inet sockets as at
// base: a relayed connection whose peer is gone closes when the daemon
// notices. It fails the test, listing the daemon's sockets, if that takes
// longer than timeout.
func settleSockets(t *testing.T, d *daemon, base figures, timeout time.Duration, what string) figures {
	t.Helper()
	f := measure(t, d)
	for deadline := time.Now().Add(timeout); f.sockets != base.sockets; f = measure(t, d) {
		if time.Now().After(deadline) {
			out, _ := exec.Command("ss", "-tanpe").CombinedOutput()
			t.Errorf("%s: inet sockets %d, baseline %d (listeners leaked?); the daemon's (pid %d):\n%s", what, f.sockets, base.sockets,
				d.cmd.Process.Pid, grepLines(string(out), fmt.Sprintf("pid=%d,", d.cmd.Process.Pid)))
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	return f
}

func grepLines(s, substr string) string {
	var b strings.Builder
	for _, line := range strings.Split(s, "\n") {
		if strings.Contains(line, substr) {
			b.WriteString(line + "\n")
		}
	}
	return b.String()
}

// baseline measures the daemon once it is quiet: two equal readings of
// descriptors and goroutines in a row.
func baseline(t *testing.T, d *daemon) figures {
	t.Helper()
	prev := measure(t, d)
	for i := 0; i < 50; i++ {
		time.Sleep(200 * time.Millisecond)
		f := measure(t, d)
		if f.fds == prev.fds && f.goroutines == prev.goroutines {
			return f
		}
		prev = f
	}
	return prev
}

// status reads the daemon's /status.
func status(t *testing.T, d *daemon) admin.Status {
	t.Helper()
	// Not get(): its kept-alive connection would count as a daemon socket.
	c := http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get("http://" + d.admin + "/status")
	if err != nil {
		t.Fatalf("/status: %v", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("/status: %v", err)
	}
	var st admin.Status
	if err := json.Unmarshal(body, &st); err != nil {
		t.Fatalf("/status is not JSON: %v\n%s", err, body)
	}
	return st
}

// waitServed waits until a GET to localhost:port inside the container
// reaches a backend, and returns the body.
func waitServed(t *testing.T, ns string, port int, timeout time.Duration) string {
	t.Helper()
	var body string
	eventually(t, timeout, fmt.Sprintf("request through localhost:%d in %s", port, ns), func() error {
		var err error
		body, err = getIn(ns, fmt.Sprintf("http://127.0.0.1:%d/", port))
		return err
	})
	return body
}

// hold reads what a client sends and never answers, until the client or
// the test's end closes the connection.
func hold(c *net.TCPConn) { _, _ = io.Copy(io.Discard, c) }

// srvRecord registers one loopback port under an SRV name.
func srvRecord(name, target string, port uint16) ([]testenv.SRV, map[string][]string) {
	return []testenv.SRV{{Name: name, Target: target, Port: port, Priority: 1, Weight: 10}},
		map[string][]string{target: {"127.0.0.1"}}
}

// merge joins record sets for one dnsmasq.
func merge(sets ...any) ([]testenv.SRV, map[string][]string) {
	var srvs []testenv.SRV
	hosts := map[string][]string{}
	for i := 0; i+1 < len(sets); i += 2 {
		srvs = append(srvs, sets[i].([]testenv.SRV)...)
		for k, v := range sets[i+1].(map[string][]string) {
			hosts[k] = v
		}
	}
	return srvs, hosts
}

// startDnsmasqAt starts dnsmasq on 127.0.0.1:port (a free one if 0),
// serving srvs and hosts; a test may stop it and start another on its port.
func startDnsmasqAt(t *testing.T, port int, srvs []testenv.SRV, hosts map[string][]string) *testenv.DNSServer {
	t.Helper()
	return testenv.StartDnsmasq(t, port, testenv.Records(srvs, hosts)...)
}

// countLines counts the log lines holding every one of substrs.
func countLines(logs string, substrs ...string) int {
	n := 0
	sc := bufio.NewScanner(strings.NewReader(logs))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
next:
	for sc.Scan() {
		for _, s := range substrs {
			if !strings.Contains(sc.Text(), s) {
				continue next
			}
		}
		n++
	}
	return n
}
