package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
	"github.com/connectable/connectable/iptables"
	"github.com/connectable/connectable/netns"
)

// TestChaosPIDReuse reproduces issue 13 §3's race on the real engine: a
// labelled container is set up, the daemon is held (SIGSTOP, as a long
// engine outage or a stuck daemon would delay its teardown), the container
// dies, and a process in a fresh network namespace gets the container's old
// PID (through /proc/sys/kernel/ns_last_pid). That namespace holds what
// another tenant's would: connectable's chain with a rule, and a listener.
// When the daemon resumes, its late teardown, and the resyncs after it, must
// leave that namespace exactly as it was: nothing cleared, nothing set up.
// Entering by /proc/<pid>/ns/net, as before the namespace handles, the
// teardown wiped the impostor's chain.
func TestChaosPIDReuse(t *testing.T) {
	prerequisites(t)
	testenv.NeedCommand(t, "unshare", "ip", "ss", "bash")
	be := startBackend(t, "be")
	srvs, hosts := service("web.service.test", be)
	d := startDaemon(t, testenv.Dnsmasq(t, srvs, hosts))
	id := container(t, "-l", "connect.6000=web.service.test")
	oldPid := pid(t, id)
	waitServed(t, netnsOf(t, id), 6000, 60*time.Second)
	key := "key=" + id[:12]

	// The daemon is held from here: it sees nothing happen.
	if err := d.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	resumed := false
	resume := func() {
		if !resumed {
			resumed = true
			if err := d.cmd.Process.Signal(syscall.SIGCONT); err != nil {
				t.Errorf("resuming the daemon: %v", err)
			}
		}
	}
	t.Cleanup(resume)

	testenv.Run(t, "docker", "kill", id)
	eventually(t, 60*time.Second, "the container's process gone", func() error {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", oldPid)); err == nil {
			return fmt.Errorf("process %d still there", oldPid)
		}
		return nil
	})
	impostor := spawnAtPID(t, oldPid)
	_, snapshot := impostorNamespace(t, impostor)
	before := snapshot()

	page, _ := scrape(d.admin)
	resyncs := metric(page, "connectable_docker_resyncs_total")
	resume()
	eventually(t, 60*time.Second, "the dead container's namespace removed", func() error {
		if countLines(d.logs.String(), "namespace removed", key) == 0 {
			return errors.New("not yet")
		}
		return nil
	})
	// Two more resyncs (every 2s): any set-up they led to is done by then.
	waitResyncs(t, d, resyncs+2)
	if after := snapshot(); after != before {
		t.Errorf("the namespace that took the dead container's PID changed:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	if n := countLines(d.logs.String(), "ERROR", key); n != 0 {
		t.Errorf("%d errors about the removed key:\n%s", n, grepLines(d.logs.String(), key))
	}
}

// spawnAtPID starts a process in a fresh network namespace with PID pid,
// which must be free: ns_last_pid is set just below it, and the next fork
// takes it unless another process on the machine forks first; then it tries
// again. The process is killed when the test ends.
func spawnAtPID(t *testing.T, pid int) int {
	t.Helper()
	for attempt := 0; attempt < 200; attempt++ {
		// unshare(1) keeps its PID: it unshares, then execs sleep.
		out, err := exec.Command("bash", "-c", fmt.Sprintf(
			"echo %d > /proc/sys/kernel/ns_last_pid; unshare -n sleep 3600 >/dev/null 2>&1 & echo $!", pid-1)).Output()
		if err != nil {
			t.Fatalf("spawning at PID %d: %v", pid, err)
		}
		got, err := strconv.Atoi(strings.TrimSpace(string(out)))
		if err != nil {
			t.Fatalf("spawning at PID %d: %q", pid, out)
		}
		t.Cleanup(func() { _ = syscall.Kill(got, syscall.SIGKILL) })
		if got == pid {
			// unshare has unshared once its namespace differs from ours.
			eventually(t, 10*time.Second, "the impostor in its own namespace", func() error {
				mine, _ := os.Readlink("/proc/self/ns/net")
				its, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", pid))
				if err != nil || its == mine {
					return fmt.Errorf("namespace %q (%v)", its, err)
				}
				if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); strings.TrimSpace(string(comm)) != "sleep" {
					return fmt.Errorf("still %q", comm)
				}
				return nil
			})
			return got
		}
		_ = syscall.Kill(got, syscall.SIGKILL)
	}
	t.Fatalf("no process got PID %d in 200 attempts: others fork too fast", pid)
	return 0
}

// stripCounters removes the packet counters iptables-save prints, which
// traffic changes.
func stripCounters(s string) string {
	var b strings.Builder
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(l, ":") {
			if i := strings.LastIndex(l, " ["); i > 0 {
				l = l[:i]
			}
		}
		if strings.HasPrefix(l, "#") {
			continue
		}
		b.WriteString(l + "\n")
	}
	return b.String()
}

// TestChaosPIDReuseSetUp is the set-up side of the race: the daemon reads a
// container's PID from an inspection, and before it opens the namespace the
// container dies and another process, in another namespace, gets the PID. A
// proxy between the daemon and the engine holds that one inspection's
// answer (running, PID P) while the test kills the container and spawns the
// impostor at P. The daemon must refuse that namespace, say so, and leave it
// untouched.
func TestChaosPIDReuseSetUp(t *testing.T) {
	prerequisites(t)
	testenv.NeedCommand(t, "unshare", "ip", "ss", "bash")
	be := startBackend(t, "be")
	srvs, hosts := service("web.service.test", be)
	tag := testenv.RandomName("pidreuse-")
	api := holdInspection(t, tag) // unique: found only in this container's labels
	d := startDaemon(t, testenv.Dnsmasq(t, srvs, hosts), "--docker-host", "unix://"+api.sock)

	id := container(t, "-l", "connect.6000=web.service.test", "-l", "chaos.pidreuse="+tag)
	var oldPid int
	select {
	case oldPid = <-api.captured:
	case <-time.After(60 * time.Second):
		t.Fatal("the daemon never inspected the container")
	}
	if oldPid == 0 {
		t.Fatal("the first inspection shows no process")
	}
	testenv.Run(t, "docker", "kill", id)
	eventually(t, 20*time.Second, "the container's process gone", func() error {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", oldPid)); err == nil {
			return fmt.Errorf("process %d still there", oldPid)
		}
		return nil
	})
	impostor := spawnAtPID(t, oldPid)
	ns, snapshot := impostorNamespace(t, impostor)
	before := snapshot()
	close(api.release)

	name := strings.TrimPrefix(testenv.Run(t, "docker", "inspect", "-f", "{{.Name}}", id), "/")
	name = strings.TrimSpace(name)
	eventually(t, 60*time.Second, "the refusal of the reused PID's namespace", func() error {
		if countLines(d.logs.String(), "could not be opened as the container's", "container="+name) == 0 {
			return errors.New("not logged")
		}
		return nil
	})
	page, _ := scrape(d.admin)
	resyncs := metric(page, "connectable_docker_resyncs_total")
	waitResyncs(t, d, resyncs+2)
	if after := snapshot(); after != before {
		t.Errorf("the namespace that took the container's PID (%s) changed:\nbefore:\n%s\nafter:\n%s", ns, before, after)
	}
	if n := countLines(d.logs.String(), "namespace set up", "key="+id[:12]); n != 0 {
		t.Errorf("the dead container's namespace was set up %d times", n)
	}
}

// impostorNamespace gives the process pid's namespace what another tenant's
// would hold (connectable's chain with a rule, in every backend there is,
// and a listener) and returns its path and a function that snapshots it.
func impostorNamespace(t *testing.T, pid int) (string, func() string) {
	t.Helper()
	name := testenv.RandomName("cnt-impostor-")
	ns := "/var/run/netns/" + name
	testenv.Run(t, "ip", "netns", "attach", name, strconv.Itoa(pid))
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", name, err, out)
		}
	})
	testenv.Exec(t, ns, "ip", "link", "set", "lo", "up")
	var backends []string
	for _, b := range []string{"nft", "legacy"} {
		if _, err := exec.LookPath("iptables-" + b); err != nil {
			continue
		}
		backends = append(backends, b)
		ipt := "iptables-" + b
		testenv.Exec(t, ns, ipt, "-t", "nat", "-N", iptables.Chain)
		testenv.Exec(t, ns, ipt, "-t", "nat", "-A", iptables.Chain, "-p", "tcp", "--dport", "6000", "-j", "REDIRECT", "--to-ports", "7777")
		testenv.Exec(t, ns, ipt, "-t", "nat", "-A", "OUTPUT", "-j", iptables.Chain)
	}
	var ln net.Listener
	if err := netns.Do(ns, func() (err error) {
		ln, err = net.Listen("tcp4", "127.0.0.1:7777")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	snapshot := func() string {
		var b strings.Builder
		for _, backend := range backends {
			b.WriteString(testenv.Exec(t, ns, "iptables-"+backend+"-save", "-t", "nat"))
		}
		b.WriteString(testenv.Exec(t, ns, "ss", "-ltnH"))
		return stripCounters(b.String())
	}
	if s := snapshot(); !strings.Contains(s, "-A "+iptables.Chain) || !strings.Contains(s, "127.0.0.1:7777") {
		t.Fatalf("impostor namespace not as made:\n%s", s)
	}
	return ns, snapshot
}

// heldAPI is a proxy to the local engine's socket that holds back the
// inspection answers naming a marker until release is closed, and reports
// the PID in the first.
type heldAPI struct {
	sock     string
	captured chan int // the PID that answer reports
	release  chan struct{}
}

func holdInspection(t *testing.T, marker string) *heldAPI {
	t.Helper()
	dir := t.TempDir()
	h := &heldAPI{sock: filepath.Join(dir, "docker.sock"), captured: make(chan int, 1), release: make(chan struct{})}
	ln, err := net.Listen("unix", h.sock)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	held := 0 // answers held so far
	inspect := regexp.MustCompile(`/containers/[^/]+/json$`)
	rp := &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			r.Out.URL.Scheme, r.Out.URL.Host = "http", "docker"
		},
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", "/var/run/docker.sock")
		}},
		FlushInterval: -1, // the event stream
		ModifyResponse: func(resp *http.Response) error {
			if !inspect.MatchString(resp.Request.URL.Path) {
				return nil
			}
			body, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil {
				return err
			}
			resp.Body = io.NopCloser(bytes.NewReader(body))
			if !bytes.Contains(body, []byte(marker)) {
				return nil
			}
			var c struct{ State struct{ Pid int } }
			if json.Unmarshal(body, &c) != nil {
				return nil
			}
			select {
			case <-h.release:
				return nil // released: answers pass
			default:
			}
			// Every answer about the container is held, the first one
			// captured: a later one (a resync's, the die event's) must
			// not overtake it and make it stale. After the release they
			// follow the first in the order they came.
			mu.Lock()
			n := held
			held++
			mu.Unlock()
			if n == 0 {
				h.captured <- c.State.Pid
			}
			select {
			case <-h.release:
				time.Sleep(time.Duration(n) * 500 * time.Millisecond)
			case <-resp.Request.Context().Done():
			}
			return nil
		},
	}
	srv := &http.Server{Handler: rp}
	go srv.Serve(ln)
	t.Cleanup(func() {
		select {
		case <-h.release:
		default:
			close(h.release)
		}
		srv.Close()
	})
	return h
}

// waitResyncs waits until the daemon has made n full resyncs in all: any
// set-up they led to is done by then.
func waitResyncs(t *testing.T, d *daemon, n float64) {
	t.Helper()
	eventually(t, 60*time.Second, fmt.Sprintf("%v resyncs", n), func() error {
		page, err := scrape(d.admin)
		if err != nil {
			return err
		}
		if got := metric(page, "connectable_docker_resyncs_total"); got < n {
			return fmt.Errorf("%v resyncs, want %v", got, n)
		}
		return nil
	})
}
