package e2e

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
)

// TestChaosNoOpenRelay connects straight to the proxy port P inside a
// container's namespace (no NAT entry), and to a port without a label: both
// must be closed without anything being dialled. A port with a rule but no
// route cannot be made with labels; proxy's TestApplyAndRelay covers it
// with a fake original destination.
func TestChaosNoOpenRelay(t *testing.T) {
	prerequisites(t)
	be := testenv.StartBackend(t, testenv.Echo)
	srvs, hosts := srvRecord("echo.service.test", "echo.node.test", be.Port())
	d := startDaemon(t, testenv.Dnsmasq(t, srvs, hosts))
	id := container(t, "-l", "connect.6000=echo.service.test")
	ns := netnsOf(t, id)
	var proxyPort uint16
	eventually(t, 30*time.Second, "the container set up", func() error {
		c, err := dialIn(ns, "127.0.0.1:6000", 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		fmt.Fprintln(c, "ping")
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = bufio.NewReader(c).ReadString('\n')
		return err
	})
	if ns := findNamespace(status(t, d), id); ns != nil {
		proxyPort = ns.ProxyPort
	}
	if proxyPort == 0 {
		t.Fatalf("no proxy port for %.12s in /status", id)
	}
	accepted := be.Accepted.Load()
	page, _ := scrape(d.admin)
	rejected := metric(page, "connectable_connections_rejected_total")

	for _, addr := range []string{fmt.Sprintf("127.0.0.1:%d", proxyPort), fmt.Sprintf("[::1]:%d", proxyPort)} {
		c, err := dialIn(ns, addr, 5*time.Second)
		if err != nil {
			t.Logf("direct connection to %s: %v (nothing listens there)", addr, err)
			continue
		}
		start := time.Now()
		fmt.Fprintln(c, "relay me")
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		n, err := io.Copy(io.Discard, c)
		c.Close()
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Errorf("direct connection to %s held open for 10s", addr)
		}
		t.Logf("direct connection to the proxy port %s: closed after %v (%d bytes, %v)", addr, time.Since(start).Round(time.Millisecond), n, err)
	}
	if c, err := dialIn(ns, "127.0.0.1:6001", 5*time.Second); err == nil {
		c.Close()
		t.Errorf("an unlabelled port accepts connections")
	}
	eventually(t, 10*time.Second, "the rejection counted", func() error {
		page, _ := scrape(d.admin)
		if v := metric(page, "connectable_connections_rejected_total"); v <= rejected {
			return fmt.Errorf("rejected_total %v", v)
		}
		return nil
	})
	if got := be.Accepted.Load(); got != accepted {
		t.Errorf("the backend saw %d connections from direct connections to the proxy port", got-accepted)
	}
	if !d.waitLog("direct connection to proxy port refused", 5*time.Second) {
		t.Errorf("no log line about the direct connection")
	}
}

// TestChaosAdminReadOnly checks the admin endpoint listens on loopback by
// default, and that no method but GET does anything on any path.
func TestChaosAdminReadOnly(t *testing.T) {
	prerequisites(t)
	// The default, as --help states it and as a daemon without --admin
	// binds it.
	help, _ := exec.Command(binary, "--help").CombinedOutput()
	i := strings.Index(string(help), "--admin")
	if i < 0 || !strings.Contains(string(help[i:]), `(default "127.0.0.1:9876")`) {
		t.Errorf("--help does not give 127.0.0.1:9876 as the admin default:\n%s", help)
	}
	_, dns := webService(t)
	plain := exec.Command(binary, "--dns", dns, "--datapath", "relay") // the admin listener is the subject; nothing to pin
	logs := &testenv.SyncBuffer{}
	plain.Stdout, plain.Stderr = logs, logs
	if err := plain.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = plain.Wait(); close(done) }()
	func() {
		defer func() { _ = plain.Process.Kill(); <-done }()
		var listeners string
		eventually(t, 20*time.Second, "the default admin listener", func() error {
			out, _ := exec.Command("ss", "-ltnpH").CombinedOutput()
			listeners = grepLines(string(out), fmt.Sprintf("pid=%d,", plain.Process.Pid))
			if listeners == "" {
				return fmt.Errorf("no listener yet; logs:\n%s", logs.String())
			}
			return nil
		})
		for _, line := range strings.Split(strings.TrimSpace(listeners), "\n") {
			if f := strings.Fields(line); len(f) < 4 || f[3] != "127.0.0.1:9876" {
				t.Errorf("the daemon without --admin listens on: %s", line)
			}
		}
		t.Logf("without --admin, the daemon's only listener in the host namespace: %s", strings.Join(strings.Fields(listeners)[:4], " "))
	}()

	d := startDaemon(t, dns)
	id := container(t, "-l", "connect.6000=web.service.test")
	waitServed(t, netnsOf(t, id), 6000, 30*time.Second)
	before := status(t, d)
	client := http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	codes := map[int]int{}
	for _, path := range []string{"/", "/metrics", "/status", "/healthz", "/debug/pprof/", "/debug/vars", "/reload", "/status/" + id[:12], "/namespaces"} {
		for _, method := range []string{http.MethodPost, http.MethodPut, http.MethodDelete, http.MethodPatch} {
			req, _ := http.NewRequest(method, "http://"+d.admin+path, strings.NewReader(`{"routes":{"6000":"evil.example:80"}}`))
			resp, err := client.Do(req)
			if err != nil {
				t.Errorf("%s %s: %v", method, path, err)
				continue
			}
			resp.Body.Close()
			codes[resp.StatusCode]++
			if resp.StatusCode != http.StatusMethodNotAllowed && resp.StatusCode != http.StatusNotFound {
				t.Errorf("%s %s: %s; want 405 or 404", method, path, resp.Status)
			}
		}
	}
	t.Logf("write methods on the admin endpoint: status codes %v", codes)
	after := status(t, d)
	for i := range before.Namespaces {
		before.Namespaces[i].Routes, before.Namespaces[i].Active = nil, 0
	}
	for i := range after.Namespaces {
		after.Namespaces[i].Routes, after.Namespaces[i].Active = nil, 0
	}
	if !reflect.DeepEqual(before, after) {
		t.Errorf("/status changed:\nbefore %+v\nafter  %+v", before, after)
	}
	if body := waitServed(t, netnsOf(t, id), 6000, 10*time.Second); body != "be" {
		t.Errorf("after the requests, localhost:6000 reaches %q", body)
	}
}

// TestChaosCapabilities runs the containerised daemon with the least
// privilege that works (NET_ADMIN, SYS_ADMIN, --pid=host; no --privileged,
// which this engine cannot even grant), and without each part of it: it
// must then fail at start, naming what is missing. Relay only, whatever
// CONNECTABLE_E2E_DATAPATH says: the capabilities under test are the
// relay's.
func TestChaosCapabilities(t *testing.T) {
	prerequisites(t)
	tag := daemonImage(t)
	_, dns := webService(t)
	common := []string{"--network=host", "-v", "/var/run/docker.sock:/var/run/docker.sock"}
	// The backend is on the host's loopback, which the target policy
	// refuses unless told otherwise.
	daemonArgs := []string{tag, "--datapath", "relay", "--dns", dns, "--admin", fmt.Sprintf("127.0.0.1:%d", freePort(t)), "--allow-targets", "127.0.0.0/8"}

	for _, tc := range []struct {
		name  string
		args  []string
		wants []string // in the error message
	}{
		{"no capabilities", []string{"--pid=host"}, []string{"CAP_NET_ADMIN", "CAP_SYS_ADMIN", "--cap-add"}},
		{"NET_ADMIN only", []string{"--pid=host", "--cap-add", "NET_ADMIN"}, []string{"CAP_SYS_ADMIN"}},
		{"SYS_ADMIN only", []string{"--pid=host", "--cap-add", "SYS_ADMIN"}, []string{"CAP_NET_ADMIN"}},
		{"no --pid=host", []string{"--cap-add", "NET_ADMIN", "--cap-add", "SYS_ADMIN"}, []string{"--pid=host"}},
		{"no --pid=host, with --init", []string{"--init", "--cap-add", "NET_ADMIN", "--cap-add", "SYS_ADMIN"}, []string{"--pid=host"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append(append(append([]string{"run", "--rm", "--label", testenv.TestLabel}, common...), tc.args...), daemonArgs...)
			cmd := exec.Command("docker", args...)
			start := time.Now()
			out, err := runWithTimeout(cmd, 60*time.Second)
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() == 0 {
				t.Fatalf("docker run %s: %v, want a non-zero exit; output:\n%s", strings.Join(tc.args, " "), err, out)
			}
			for _, want := range tc.wants {
				if !strings.Contains(out, want) {
					t.Errorf("the start-up error does not mention %s:\n%s", want, out)
				}
			}
			t.Logf("%s: exit %d after %v: %s", tc.name, ee.ExitCode(), time.Since(start).Round(time.Millisecond), strings.TrimSpace(out))
		})
	}

	t.Run("least privilege works", func(t *testing.T) {
		daemon := testenv.RunContainer(t, append(append(common, "--cap-add", "NET_ADMIN", "--cap-add", "SYS_ADMIN", "--pid=host"), daemonArgs...)...)
		t.Cleanup(func() {
			if t.Failed() {
				out, _ := exec.Command("docker", "logs", daemon).CombinedOutput()
				t.Logf("daemon container logs:\n%s", out)
			}
		})
		id := container(t, "-l", "connect.6000=web.service.test")
		if body := waitServed(t, netnsOf(t, id), 6000, 30*time.Second); body != "be" {
			t.Errorf("served by %q", body)
		}
		testenv.Run(t, "docker", "stop", "-t", "20", daemon)
	})
}

// runWithTimeout runs cmd and returns its combined output, killing it (by
// PID) after timeout.
func runWithTimeout(cmd *exec.Cmd, timeout time.Duration) (string, error) {
	var out testenv.SyncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		return "", err
	}
	timer := time.AfterFunc(timeout, func() { _ = cmd.Process.Kill() })
	defer timer.Stop()
	err := cmd.Wait()
	return out.String(), err
}
