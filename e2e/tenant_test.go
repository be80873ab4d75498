package e2e

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
)

// Tenant isolation against a real daemon and engine (README "Security
// model"): what a container's labels may reach, and what one container's
// connections may take from the others.

// echoOnce connects from inside ns to 127.0.0.1:port, writes a line and
// reports whether the echo came back.
func echoOnce(ns string, port int) error {
	c, err := dialIn(ns, fmt.Sprintf("127.0.0.1:%d", port), 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := fmt.Fprintln(c, "ping"); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return fmt.Errorf("no echo: %w", err)
	}
	if line != "ping\n" {
		return fmt.Errorf("echo %q", line)
	}
	return nil
}

// bridgeSubnet returns the default bridge network's IPv4 subnet.
func bridgeSubnet(t *testing.T) string {
	t.Helper()
	out := strings.TrimSpace(testenv.Run(t, "docker", "network", "inspect", "bridge", "-f", "{{range .IPAM.Config}}{{.Subnet}} {{end}}"))
	for _, f := range strings.Fields(out) {
		if !strings.Contains(f, ":") {
			return f
		}
	}
	t.Fatalf("no IPv4 subnet on the bridge network: %q", out)
	return ""
}

// TestChaosTargetPolicy: a container's labels name the admin endpoint, a
// service on the host's loopback (directly, v4-mapped, and through an SRV
// record), the cloud metadata address and a bridge subnet the operator
// denied. With the default policy each is refused before any connect: the
// client's connection is closed, nothing reaches the backends, the refusal
// is logged once, counted per service and shown in /status. A second daemon
// with --allow-targets 127.0.0.0/8 relays the loopback ones.
func TestChaosTargetPolicy(t *testing.T) {
	prerequisites(t)
	be := testenv.StartBackend(t, testenv.Echo)
	srvs, hosts := srvRecord("loop.service.test", "loop.node.test", be.Port())
	dns := testenv.Dnsmasq(t, srvs, hosts)
	subnet := bridgeSubnet(t)
	other := container(t) // an address in the denied bridge subnet
	otherIP := strings.TrimSpace(testenv.Run(t, "docker", "inspect", "-f", "{{.NetworkSettings.IPAddress}}", other))
	if otherIP == "" {
		t.Fatalf("no bridge address for %.12s", other)
	}

	// The default policy, and the bridge denied: the harness's
	// --allow-targets is overridden by the empty one after it.
	d := startDaemon(t, dns, "--allow-targets", "", "--deny-targets", subnet)
	adminPort := d.admin[strings.LastIndexByte(d.admin, ':')+1:]
	targets := []struct {
		port    int
		service string
		refused string // the endpoint the log names
	}{
		{7001, "127.0.0.1:" + adminPort, "127.0.0.1:" + adminPort},
		{7002, fmt.Sprintf("127.0.0.1:%d", be.Port()), fmt.Sprintf("127.0.0.1:%d", be.Port())},
		{7003, fmt.Sprintf("[::ffff:127.0.0.1]:%d", be.Port()), fmt.Sprintf("[::ffff:127.0.0.1]:%d", be.Port())},
		{7004, "169.254.169.254:80", "169.254.169.254:80"},
		{7005, otherIP + ":80", otherIP + ":80"},
		{7006, "loop.service.test", fmt.Sprintf("127.0.0.1:%d", be.Port())},
	}
	args := []string{}
	for _, tg := range targets {
		args = append(args, "-l", fmt.Sprintf("connect.%d=%s", tg.port, tg.service))
	}
	id := container(t, args...)
	ns := netnsOf(t, id)
	eventually(t, 30*time.Second, "the container set up", func() error {
		if n := findNamespace(status(t, d), id); n == nil || n.ProxyPort == 0 {
			return fmt.Errorf("not in /status yet")
		}
		return nil
	})

	for _, tg := range targets {
		for range 2 {
			if err := echoOnce(ns, tg.port); err == nil {
				t.Errorf("%s (port %d): relayed; want refused", tg.service, tg.port)
			}
		}
	}
	if n := be.Accepted.Load(); n != 0 {
		t.Errorf("the loopback backend accepted %d connections", n)
	}
	eventually(t, 10*time.Second, "the refusals counted", func() error {
		page, err := scrape(d.admin)
		if err != nil {
			return err
		}
		for _, tg := range targets {
			if v := metric(page, fmt.Sprintf(`connectable_targets_refused_total{service=%q}`, tg.service)); v < 2 {
				return fmt.Errorf("%s: targets_refused_total %v; want 2", tg.service, v)
			}
		}
		return nil
	})
	// Once per namespace and endpoint: the SRV name's endpoint is the
	// one 7002 names, already logged.
	for _, tg := range targets {
		lines := d.logs.Lines("endpoint refused by the target policy", "endpoint="+tg.refused+" ")
		if len(lines) != 1 {
			t.Errorf("%s: %d refusal lines naming %s; want 1 (once per namespace and endpoint)", tg.service, len(lines), tg.refused)
		}
	}
	if !strings.Contains(d.logs.String(), "--deny-targets "+subnet) {
		t.Errorf("the bridge refusal does not name --deny-targets %s", subnet)
	}
	refusedShown := 0
	if n := findNamespace(status(t, d), id); n != nil {
		for _, r := range n.Routes {
			for _, e := range r.Endpoints {
				if e.Refused && e.Failures == 0 {
					refusedShown++
				}
			}
		}
	}
	if refusedShown != len(targets) {
		t.Errorf("/status shows %d refused endpoints (without failures); want %d", refusedShown, len(targets))
	}
	if n := grepLines(ssDaemon(t, d), "169.254.169.254"); n != "" {
		t.Errorf("the daemon has a socket to the metadata address:\n%s", n)
	}
	d.stop(syscall.SIGTERM)

	// The operator opens loopback: the same labels reach the admin
	// endpoint and the backend. 169.254.169.254 stays refused; the bridge
	// is not tried (nothing listens there).
	// The second daemon takes the first one's admin address, which the
	// label on 7001 names.
	d2 := startDaemon(t, dns, "--allow-targets", "127.0.0.0/8", "--admin", d.admin)
	eventually(t, 30*time.Second, "loopback relayed once allowed", func() error {
		for _, port := range []int{7002, 7003, 7006} {
			if err := echoOnce(ns, port); err != nil {
				return fmt.Errorf("port %d: %w", port, err)
			}
		}
		return nil
	})
	if body, err := getIn(ns, "http://127.0.0.1:7001/healthz"); err != nil {
		t.Errorf("the admin endpoint through an allowed label: %v", err)
	} else {
		t.Logf("with --allow-targets 127.0.0.0/8, localhost:7001 in the container reaches the admin endpoint: %q", body)
	}
	if err := echoOnce(ns, 7004); err == nil {
		t.Errorf("169.254.169.254 relayed with only loopback allowed")
	}
	if !d2.waitLog("endpoint=169.254.169.254:80", 10*time.Second) {
		t.Errorf("no refusal of 169.254.169.254 logged by the second daemon")
	}
}

// ssDaemon lists the daemon's TCP sockets, as ss prints them.
func ssDaemon(t *testing.T, d *daemon) string {
	t.Helper()
	out, _ := exec.Command("ss", "-tanpH").CombinedOutput()
	return grepLines(string(out), fmt.Sprintf("pid=%d,", d.cmd.Process.Pid))
}

// floodScript opens n connections to 127.0.0.1:port from the namespace it
// runs in, keeps them, prints how many connected, and closes them all when
// its stdin closes. A process of its own: its file limit is its own, and
// the test process's could not hold an attacker's 20,000 sockets.
const floodScript = `
import socket, sys
n, port = int(sys.argv[1]), int(sys.argv[2])
conns, failed = [], 0
for i in range(n):
    try:
        conns.append(socket.create_connection(("127.0.0.1", port), timeout=5))
    except OSError:
        failed += 1
print(len(conns), failed, flush=True)
sys.stdin.read()
`

// floodProc is one attacker process holding connections inside a namespace.
type floodProc struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	done  chan struct{}
}

// floodFrom starts an attacker process in ns opening n connections to
// port, and waits until it has tried them all; it returns how many
// connected. The process ends with stop, or when the test ends.
func floodFrom(t *testing.T, ns string, port, n int) (*floodProc, int) {
	t.Helper()
	cmd := exec.Command("nsenter", "--net="+ns, "python3", "-c", floodScript, fmt.Sprint(n), fmt.Sprint(port))
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr testenv.SyncBuffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting the attacker: %v", err)
	}
	p := &floodProc{cmd: cmd, stdin: stdin, done: make(chan struct{})}
	line, err := bufio.NewReader(stdout).ReadString('\n')
	go func() { _ = cmd.Wait(); close(p.done) }()
	t.Cleanup(p.stop)
	var ok, failed int
	if _, serr := fmt.Sscan(line, &ok, &failed); err != nil || serr != nil {
		t.Fatalf("attacker in %s: %q, %v: %s", ns, line, err, stderr.String())
	}
	t.Logf("attacker process: %d of %d connects succeeded, %d failed", ok, n, failed)
	return p, ok
}

// stop closes the attacker's connections by ending it.
func (p *floodProc) stop() {
	p.stdin.Close()
	select {
	case <-p.done:
	case <-time.After(30 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// flood opens n connections from inside ns to 127.0.0.1:port, from a few
// goroutines, and returns those that connected. Connections the daemon
// resets at its cap are kept too, as an attacker would keep them.
func flood(ns string, port, n int) ([]net.Conn, int) {
	var (
		mu     sync.Mutex
		conns  []net.Conn
		failed atomic.Int64
		wg     sync.WaitGroup
	)
	const workers = 8
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < n; i += workers {
				c, err := dialIn(ns, fmt.Sprintf("127.0.0.1:%d", port), 5*time.Second)
				if err != nil {
					failed.Add(1)
					continue
				}
				mu.Lock()
				conns = append(conns, c)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return conns, int(failed.Load())
}

// victimServed checks that the victim's new connections are served while
// the attacker floods, and logs their latency.
func victimServed(t *testing.T, ns string, port, n int) {
	t.Helper()
	var worst, total time.Duration
	for i := range n {
		start := time.Now()
		if err := echoOnce(ns, port); err != nil {
			t.Errorf("victim connection %d: %v", i, err)
			continue
		}
		d := time.Since(start)
		total += d
		worst = max(worst, d)
	}
	t.Logf("victim: %d connections served during the flood, mean %v, worst %v", n, (total / time.Duration(n)).Round(time.Microsecond), worst.Round(time.Microsecond))
}

// TestChaosIdleFlood: one container opens 20,000 idle connections to its
// labelled port, whose backend accepts and never answers. The daemon relays
// up to the namespace's cap and resets the rest at accept; another
// container's new connections are still served, the daemon's descriptors
// stay under what the cap allows, and once the attacker closes everything
// the daemon returns to its baseline.
func TestChaosIdleFlood(t *testing.T) {
	prerequisites(t)
	testenv.NeedCommand(t, "python3")
	begun := time.Now() // after the machine-wide daemon lock
	const (
		attack = 20000
		capNS  = 2000
	)
	holdBe := testenv.StartBackend(t, hold)
	echoBe := testenv.StartBackend(t, testenv.Echo)
	s1, h1 := srvRecord("hold.service.test", "hold.node.test", holdBe.Port())
	s2, h2 := srvRecord("echo.service.test", "echo.node.test", echoBe.Port())
	srvs, hosts := merge(s1, h1, s2, h2)
	dns := testenv.Dnsmasq(t, srvs, hosts)
	d := startDaemon(t, dns, "--max-conns-per-namespace", fmt.Sprint(capNS), "--log-level", "info")
	attacker := container(t, "-l", "connect.6000=hold.service.test")
	victim := container(t, "-l", "connect.6000=echo.service.test")
	ans, vns := netnsOf(t, attacker), netnsOf(t, victim)
	waitAttackerAndVictim(t, d, attacker, vns)
	base := baseline(t, d)
	t.Logf("baseline: %v", base)

	start := time.Now()
	// Two processes of 10,000: each stays within a file limit of 20,000.
	var procs []*floodProc
	connected := 0
	for range 2 {
		p, n := floodFrom(t, ans, 6000, attack/2)
		procs = append(procs, p)
		connected += n
	}
	t.Logf("flood: %d of %d connects succeeded in %v", connected, attack, time.Since(start).Round(time.Millisecond))
	eventually(t, 60*time.Second, "the attacker's namespace at its cap", func() error {
		if n := holdBe.Live(); n < capNS*9/10 {
			return fmt.Errorf("the holding backend has %d connections", n)
		}
		return nil
	})
	victimServed(t, vns, 6000, 20)
	during := measure(t, d)
	t.Logf("during the flood: %v; backend holds %d", during, holdBe.Live())
	// Two descriptors per relayed connection, the namespace's cap of them,
	// plus the baseline and room for connections being reset.
	if limit := base.fds + 2*capNS + 200; during.fds > limit {
		t.Errorf("daemon descriptors %d during the flood; want at most %d", during.fds, limit)
	}
	if holdBe.Live() > capNS {
		t.Errorf("the backend holds %d relayed connections; the cap is %d", holdBe.Live(), capNS)
	}
	page, _ := scrape(d.admin)
	if v := metric(page, `connectable_connections_limited_total{scope="namespace"}`); v < float64(connected-capNS-100) {
		t.Errorf("connections_limited_total{scope=namespace} = %v; want about %d", v, connected-capNS)
	}
	if n := d.logs.Count("namespace at its connection cap"); n < 1 || n > 20 {
		t.Errorf("%d cap log lines; want a few (one per interval)", n)
	}

	for _, p := range procs {
		p.stop()
	}
	settle(t, d, base, 10, 60*time.Second, "after the flood")
	settleSockets(t, d, base, 60*time.Second, "after the flood")
	victimServed(t, vns, 6000, 5)
	t.Logf("TestChaosIdleFlood: %v from the lock, %v from the flood", time.Since(begun).Round(time.Second), time.Since(start).Round(time.Second))
}

// TestChaosBlackholeFlood: 10,000 connects to a label whose backend
// blackholes SYNs. The namespace's dial slots bound the daemon's sockets in
// SYN-SENT, its connection cap bounds the clients it holds, the victim is
// served meanwhile, and once the dials time out the daemon returns to its
// baseline.
func TestChaosBlackholeFlood(t *testing.T) {
	prerequisites(t)
	begun := time.Now() // after the machine-wide daemon lock
	const (
		attack = 10000
		capNS  = 2000
		dials  = 64
	)
	hole := testenv.Blackhole(t)
	echoBe := testenv.StartBackend(t, testenv.Echo)
	s1, h1 := srvRecord("hole.service.test", "hole.node.test", hole.Port())
	s2, h2 := srvRecord("echo.service.test", "echo.node.test", echoBe.Port())
	srvs, hosts := merge(s1, h1, s2, h2)
	dns := testenv.Dnsmasq(t, srvs, hosts)
	d := startDaemon(t, dns, "--max-conns-per-namespace", fmt.Sprint(capNS), "--max-dials-per-namespace", fmt.Sprint(dials),
		"--connect-timeout", "2s", "--dial-timeout", "5s", "--log-level", "info")
	attacker := container(t, "-l", "connect.6000=hole.service.test")
	victim := container(t, "-l", "connect.6000=echo.service.test")
	ans, vns := netnsOf(t, attacker), netnsOf(t, victim)
	waitAttackerAndVictim(t, d, attacker, vns)
	base := baseline(t, d)

	start := time.Now()
	conns, failed := flood(ans, 6000, attack)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	t.Logf("flood: %d of %d connects succeeded (%d failed) in %v", len(conns), attack, failed, time.Since(start).Round(time.Millisecond))
	synSent := strings.Count(ssDaemon(t, d), "SYN-SENT")
	during := measure(t, d)
	t.Logf("during the flood: %v; %d sockets in SYN-SENT", during, synSent)
	if synSent > dials {
		t.Errorf("%d daemon sockets in SYN-SENT; the dial slots are %d", synSent, dials)
	}
	if limit := base.fds + capNS + dials + 200; during.fds > limit {
		t.Errorf("daemon descriptors %d during the flood; want at most %d", during.fds, limit)
	}
	victimServed(t, vns, 6000, 20)
	for _, c := range conns {
		c.Close()
	}
	conns = nil
	settle(t, d, base, 10, 60*time.Second, "after the flood")
	settleSockets(t, d, base, 60*time.Second, "after the flood")
	page, _ := scrape(d.admin)
	t.Logf("dial failures of the blackhole: %v; connections reset at the cap: %v",
		metric(page, fmt.Sprintf("connectable_dial_failures_total{endpoint=%q}", hole.String())),
		metric(page, `connectable_connections_limited_total{scope="namespace"}`))
	t.Logf("TestChaosBlackholeFlood: %v from the lock, %v from the flood", time.Since(begun).Round(time.Second), time.Since(start).Round(time.Second))
}

// TestLabelAllow: with --label-allow, a label naming a value outside the
// patterns (an image's LABEL line included) is logged and skipped like a
// malformed one; the container's other labels still work.
func TestLabelAllow(t *testing.T) {
	prerequisites(t)
	be := startBackend(t, "be")
	srvs, hosts := service("web.service.test", be)
	d := startDaemon(t, testenv.Dnsmasq(t, srvs, hosts), "--label-allow", "*.service.test")
	id := container(t,
		"-l", fmt.Sprintf("connect.6001=127.0.0.1:%d", be.port()),
		"-l", "connect.6000=web.service.test")
	eventually(t, 20*time.Second, "request through the allowed label", func() error {
		_, err := fetch(t, id, "http://localhost:6000/")
		return err
	})
	if !d.waitLog("outside --label-allow", 10*time.Second) || !strings.Contains(d.logs.String(), "connect.6001") {
		t.Errorf("no log line names the label outside --label-allow")
	}
	if n := findNamespace(status(t, d), id); n != nil {
		for _, r := range n.Routes {
			if r.Port == 6001 {
				t.Errorf("port 6001 routed to %s despite --label-allow", r.Service)
			}
		}
	}
	if body, err := fetch(t, id, "http://localhost:6001/"); err == nil {
		t.Errorf("localhost:6001 reached %q", body)
	}
}

// waitAttackerAndVictim waits until the victim's labelled port 6000 echoes
// and the attacker's namespace is set up.
func waitAttackerAndVictim(t *testing.T, d *daemon, attacker, victimNS string) {
	t.Helper()
	eventually(t, 30*time.Second, "the victim served", func() error { return echoOnce(victimNS, 6000) })
	eventually(t, 30*time.Second, "the attacker set up", func() error {
		if n := findNamespace(status(t, d), attacker); n == nil || n.ProxyPort == 0 {
			return fmt.Errorf("not yet")
		}
		return nil
	})
}
