package e2e

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
)

// The OCI hook (issue 20): containers whose first instruction connects to
// localhost:<labelled port> are served, on a private Docker Engine with
// connectable's runtime registered (never the machine's own engine's
// configuration) and on Podman with --hooks-dir.

// hookContainersEnv sets how many containers TestHookNoStartRace starts per
// engine, data path and mode; the full run is 200.
const hookContainersEnv = "CONNECTABLE_HOOK_CONTAINERS"

// hookParallel is how many containers start at once.
const hookParallel = 8

// firstConnect is the client's whole program: its first instruction
// connects, over IPv4 and then IPv6.
const firstConnect = firstConnectV4 + " && timeout 10 wget -q -O /dev/null http://[::1]:6000/hostname"

// firstConnectV4 is the program of the socket path's clients: their
// backend has only an IPv4 address on the engine's bridge, so [::1] is
// the relay's (an IPv6 table holds only IPv6 endpoints), and the relay,
// dialling from the host, must not be sent after an address only that
// bridge has.
const firstConnectV4 = "timeout 10 wget -q -O /dev/null http://127.0.0.1:6000/hostname"

func hookContainers(t *testing.T) int {
	t.Helper()
	v := os.Getenv(hookContainersEnv)
	if v == "" {
		return 24
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 {
		t.Fatalf("%s=%q: want a positive number", hookContainersEnv, v)
	}
	return n
}

// hookDir is a short directory (a socket path must fit in 108 bytes) for
// the daemon's hook socket and the hook's log, removed when the test ends.
type hookDir struct{ dir, sock, log string }

func newHookDir(t *testing.T) hookDir {
	t.Helper()
	dir, err := os.MkdirTemp("", "cnt-hook-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return hookDir{dir: dir, sock: filepath.Join(dir, "hook.sock"), log: filepath.Join(dir, "hook.log")}
}

func (h hookDir) hookLog() string {
	b, _ := os.ReadFile(h.log)
	return string(b)
}

// hookEngine starts a private engine with two runtimes: connectable (the
// hook, 2 s) and connectable-strict (--hook-strict, 1 s).
func hookEngine(t *testing.T, h hookDir, bip string) *testenv.Engine {
	t.Helper()
	base := []string{"runtime", "--hook-socket=" + h.sock, "--hook-log=" + h.log}
	e := testenv.StartEngine(t, testenv.EngineConfig{
		Bip:      bip,
		Runtimes: map[string]string{"connectable": binary, "connectable-strict": binary},
		RuntimeArgs: map[string][]string{
			"connectable":        append(base, "--"),
			"connectable-strict": append(base, "--hook-strict=true", "--hook-timeout=1s", "--"),
		},
	})
	e.ImportBusybox(t)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("hook log:\n%s", h.hookLog())
		}
	})
	return e
}

// waitHealthy waits until the daemon follows the engine's events.
func waitHealthy(t *testing.T, d *daemon) {
	t.Helper()
	eventually(t, 30*time.Second, "the daemon follows the engine's events", func() error {
		code, body, err := get(d.admin, "/healthz")
		if err == nil && code != http.StatusOK {
			err = fmt.Errorf("/healthz: %d %s", code, body)
		}
		return err
	})
}

// startMany runs n containers, parallel at a time, each through run, and
// returns how many were not served. An error run reports as the engine's
// (not the container's) fails the test.
func startMany(t *testing.T, n int, run func(i int) (served bool, err error)) (failed int) {
	t.Helper()
	var mu sync.Mutex
	var wg sync.WaitGroup
	next := make(chan int)
	for range hookParallel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				served, err := run(i)
				mu.Lock()
				if err != nil {
					t.Errorf("container %d: %v", i, err)
				} else if !served {
					failed++
				}
				mu.Unlock()
			}
		}()
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
	return failed
}

// exitCode returns the exit status err carries, or -1.
func exitCode(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	return -1
}

// dockerFirstConnect runs one client on e with runtime rt and reports
// whether its first connects were served. docker run's own failures exit
// 125 and above.
func dockerFirstConnect(e *testenv.Engine, rt, label, program string) (bool, error) {
	_, err := e.Docker("run", "--rm", "--runtime", rt, "--label", testenv.TestLabel, "-l", label,
		"--sysctl", "net.ipv6.conf.all.disable_ipv6=0", testenv.BusyboxImageName, "sh", "-c", program)
	switch code := exitCode(err); {
	case err == nil:
		return true, nil
	case code >= 1 && code < 125:
		return false, nil
	default:
		return false, err
	}
}

// TestHookNoStartRace starts containers whose first instruction connects
// to localhost:6000 (IPv4, then [::1]): with the hook every one is served,
// in both data paths; without it the failures are counted and reported.
func TestHookNoStartRace(t *testing.T) {
	prerequisites(t)
	n := hookContainers(t)
	h := newHookDir(t)
	t0 := time.Now()
	e := hookEngine(t, h, "198.18.210.1/24")
	be, dns := webService(t)
	t.Logf("engine ready in %v", time.Since(t0).Round(time.Millisecond))
	t.Cleanup(func() { t0 = time.Now() })
	defer func() { t.Logf("subtests done; cleaning up") }()

	// For the socket path, a backend the containers reach on the engine's
	// bridge and the host does not: only a connect the socket path
	// rewrote reaches it, so a served client proves that path served it.
	out, err := e.Docker("run", "-d", "--label", testenv.TestLabel, testenv.BusyboxImageName, "httpd", "-f", "-p", "80", "-h", "/etc")
	if err != nil {
		t.Fatal(err)
	}
	id := strings.TrimSpace(string(out))
	out, err = e.Docker("inspect", "-f", "{{.NetworkSettings.IPAddress}}", id)
	if err != nil {
		t.Fatal(err)
	}
	bridgeBackend := net.JoinHostPort(strings.TrimSpace(string(out)), "80")

	for _, dp := range []string{"relay", "socket"} {
		t.Run(dp, func(t *testing.T) {
			extra := []string{"--docker-host", e.Host(), "--hook-socket", h.sock}
			label := "connect.6000=" + be.addr.String()
			program := firstConnect
			var d *daemon
			if dp == "socket" {
				d = startSocketDaemon(t, dns, extra...)
				label = "connect.6000=" + bridgeBackend
				program = firstConnectV4
			} else {
				d = startDaemonArgs(t, dns, append([]string{"--datapath", "relay"}, extra...)...)
			}
			waitHealthy(t, d)
			start := time.Now()
			failed := startMany(t, n, func(int) (bool, error) { return dockerFirstConnect(e, "connectable", label, program) })
			t.Logf("docker, %s, with the hook: %d of %d containers not served (%v)", dp, failed, n, time.Since(start).Round(time.Second))
			if failed > 0 {
				t.Errorf("with the hook, %d of %d containers were not served at their first instruction", failed, n)
			}
			start = time.Now()
			failed = startMany(t, n, func(int) (bool, error) { return dockerFirstConnect(e, "runc", label, program) })
			t.Logf("docker, %s, without the hook: %d of %d containers not served (%v)", dp, failed, n, time.Since(start).Round(time.Second))
			if set := strings.Count(d.logs.String(), `msg="container set up before its start"`); set < n {
				t.Errorf("the daemon logged %d set-ups before a start; want %d", set, n)
			}
		})
	}
}

// TestHookPodman is TestHookNoStartRace on Podman, with the hooks.d entry
// that `connectable hook-config podman` writes. Its containers have no
// network but their own loopback, so in both data paths the relay serves
// them (the socket path leaves a backend on the host's loopback to it).
func TestHookPodman(t *testing.T) {
	testenv.NeedPodman(t)
	testenv.NeedCommand(t, "dnsmasq", "busybox")
	testenv.GuardRootRules(t)
	testenv.LockDaemons(t)
	n := hookContainers(t)
	h := newHookDir(t)
	hooksDir := filepath.Join(h.dir, "hooks.d")
	if out, err := exec.Command(binary, "hook-config", "podman", "--write", hooksDir, "--hook-socket", h.sock, "--hook-log", h.log).CombinedOutput(); err != nil {
		t.Fatalf("hook-config podman: %v: %s", err, out)
	}
	p := testenv.StartPodman(t)
	be, dns := webService(t)
	label := "connect.6000=" + be.addr.String()
	run := func(hooks bool) (bool, error) {
		args := []string{"run", "--rm", "--network", "none", "--label", testenv.TestLabel, "-l", label, p.Image, "sh", "-c", firstConnect}
		if hooks {
			args = append([]string{"--hooks-dir", hooksDir}, args...)
		}
		_, err := p.Command(args...)
		switch code := exitCode(errors.Unwrap(err)); {
		case err == nil:
			return true, nil
		case code >= 1 && code < 125:
			return false, nil
		default:
			return false, err
		}
	}
	for _, dp := range []string{"relay", "socket"} {
		t.Run(dp, func(t *testing.T) {
			extra := []string{"--docker-host", p.Host, "--hook-socket", h.sock}
			var d *daemon
			if dp == "socket" {
				d = startSocketDaemon(t, dns, extra...)
			} else {
				d = startDaemonArgs(t, dns, append([]string{"--datapath", "relay"}, extra...)...)
			}
			waitHealthy(t, d)
			failed := startMany(t, n, func(int) (bool, error) { return run(true) })
			t.Logf("podman, %s, with the hook: %d of %d containers not served", dp, failed, n)
			if failed > 0 {
				t.Errorf("with the hook, %d of %d containers were not served at their first instruction", failed, n)
			}
			failed = startMany(t, n, func(int) (bool, error) { return run(false) })
			t.Logf("podman, %s, without the hook: %d of %d containers not served", dp, failed, n)
			if set := strings.Count(d.logs.String(), `msg="container set up before its start"`); set < n {
				t.Errorf("the daemon logged %d set-ups before a start; want %d", set, n)
			}
		})
	}
}

// TestHookDaemonDown: with no daemon, or one that never answers, a
// container with the hook starts within the bound (at once when nothing
// listens) and the hook's log says why; a strict hook fails the start; a
// daemon started afterwards sets the container up as usual.
func TestHookDaemonDown(t *testing.T) {
	prerequisites(t)
	h := newHookDir(t)
	e := hookEngine(t, h, "")
	be, dns := webService(t)
	label := "connect.6000=" + be.addr.String()
	start := func(rt string) (string, time.Duration, error) {
		t0 := time.Now()
		out, err := e.Docker("run", "-d", "--runtime", rt, "--network", "none", "--label", testenv.TestLabel, "-l", label, testenv.BusyboxImageName, "sleep", "3600")
		return strings.TrimSpace(string(out)), time.Since(t0), err
	}

	// Nothing listens on the socket.
	id, took, err := start("connectable")
	if err != nil {
		t.Fatalf("with the daemon down, the container did not start: %v", err)
	}
	t.Logf("daemon down: docker run -d took %v", took)
	if !strings.Contains(h.hookLog(), "is the daemon running?") {
		t.Errorf("the hook's log does not say the daemon is down:\n%s", h.hookLog())
	}
	if _, _, err := start("connectable-strict"); err == nil {
		t.Errorf("a strict hook let a container start with the daemon down")
	}

	// A daemon that accepts and never answers: the hook gives up after
	// its bound (1 s for the strict runtime's, 2 s by default).
	ln, err := net.Listen("unix", h.sock)
	if err != nil {
		t.Fatal(err)
	}
	var held []net.Conn
	var mu sync.Mutex
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			held = append(held, c)
			mu.Unlock()
		}
	}()
	slow, took, err := start("connectable")
	if err != nil {
		t.Fatalf("with a silent daemon, the container did not start: %v", err)
	}
	t.Logf("silent daemon: docker run -d took %v", took)
	if took < 2*time.Second {
		t.Errorf("docker run -d returned after %v: the hook did not wait its bound of 2s", took)
	}
	if !strings.Contains(h.hookLog(), "no answer from the daemon within") {
		t.Errorf("the hook's log does not say the daemon was silent:\n%s", h.hookLog())
	}
	ln.Close()
	mu.Lock()
	for _, c := range held {
		c.Close()
	}
	mu.Unlock()

	// The daemon, started now, sets both containers up.
	d := startDaemonArgs(t, dns, "--docker-host", e.Host(), "--hook-socket", h.sock)
	waitHealthy(t, d)
	for _, c := range []string{id, slow} {
		eventually(t, 30*time.Second, "the container is served once the daemon runs", func() error {
			out, err := e.Docker("exec", c, "timeout", "10", "wget", "-q", "-O", "-", "http://127.0.0.1:6000/")
			if err != nil {
				return err
			}
			if strings.TrimSpace(string(out)) != "be" {
				return fmt.Errorf("got %q", out)
			}
			return nil
		})
	}
}

// TestHookRefusedLabels: a container whose labels are malformed or refused
// by --label-allow starts normally with the hook, strict or not, and the
// daemon's log says why; a container without labels passes through.
func TestHookRefusedLabels(t *testing.T) {
	prerequisites(t)
	h := newHookDir(t)
	e := hookEngine(t, h, "")
	be, dns := webService(t)
	d := startDaemonArgs(t, dns, "--docker-host", e.Host(), "--hook-socket", h.sock, "--label-allow", "*.service.test")
	waitHealthy(t, d)
	for _, tc := range []struct{ name, label, log string }{
		{"malformed port", "connect.abc=web.service.test", "connect.abc"},
		{"empty value", "connect.6000=", "empty service name"},
		{"outside --label-allow", "connect.6000=" + be.addr.String(), "outside --label-allow"},
		{"no labels", "connectable.other=1", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, rt := range []string{"connectable", "connectable-strict"} {
				out, err := e.Docker("run", "-d", "--runtime", rt, "--network", "none", "--label", testenv.TestLabel, "-l", tc.label, testenv.BusyboxImageName, "sleep", "3600")
				// Strict mode fails a start only when the daemon could not
				// answer: labels it refused are its answer.
				if err != nil {
					t.Fatalf("runtime %s: the container did not start: %v", rt, err)
				}
				id := strings.TrimSpace(string(out))
				if tc.log == "" {
					continue
				}
				if !d.waitLog(tc.log, 10*time.Second) {
					t.Errorf("the daemon's log does not say %q", tc.log)
				}
				if !d.waitLog(`msg="container not set up before its start; it is set up at its start event" component=hook id=`+id[:12], 10*time.Second) {
					t.Errorf("the daemon's log does not say the hook did not set %.12s up", id)
				}
			}
		})
	}
}

// TestHookDaemonRestart restarts the daemon while containers start with
// the hook: once settled, every container is set up exactly once by the
// daemon that runs, and none is left behind once they are removed.
func TestHookDaemonRestart(t *testing.T) {
	prerequisites(t)
	h := newHookDir(t)
	e := hookEngine(t, h, "")
	be, dns := webService(t)
	label := "connect.6000=" + be.addr.String()
	extra := []string{"--docker-host", e.Host(), "--hook-socket", h.sock}
	d := startDaemonArgs(t, dns, extra...)
	waitHealthy(t, d)

	const n = 24
	var ids []string
	var mu sync.Mutex
	// The daemon is restarted once a few containers have started, while
	// the others start.
	restartNow := make(chan struct{})
	restarted := make(chan *daemon, 1)
	go func() {
		<-restartNow
		d.stop(syscall.SIGTERM)
		restarted <- startDaemonArgs(t, dns, extra...)
	}()
	startMany(t, n, func(int) (bool, error) {
		out, err := e.Docker("run", "-d", "--runtime", "connectable", "--network", "none", "--label", testenv.TestLabel, "-l", label, testenv.BusyboxImageName, "sleep", "3600")
		if err != nil {
			return false, err
		}
		mu.Lock()
		ids = append(ids, strings.TrimSpace(string(out)))
		if len(ids) == 4 {
			close(restartNow)
		}
		mu.Unlock()
		return true, nil
	})
	d2 := <-restarted
	waitHealthy(t, d2)
	for _, id := range ids {
		eventually(t, 30*time.Second, "every container is served", func() error {
			_, err := e.Docker("exec", id, "timeout", "10", "wget", "-q", "-O", "-", "http://127.0.0.1:6000/")
			return err
		})
	}
	logs := d2.logs.String()
	for _, id := range ids {
		if c := strings.Count(logs, `msg="namespace set up" component=reconcile key=`+id[:12]); c != 1 {
			t.Errorf("the running daemon set %.12s up %d times; want once", id, c)
		}
	}
	for _, id := range ids {
		if _, err := e.Docker("rm", "-f", id); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, 30*time.Second, "nothing is left once the containers are gone", func() error {
		_, body, err := get(d2.admin, "/status")
		if err != nil {
			return err
		}
		for _, id := range ids {
			if strings.Contains(body, id[:12]) {
				return fmt.Errorf("/status still shows %.12s", id)
			}
		}
		return nil
	})
}
