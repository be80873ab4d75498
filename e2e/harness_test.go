// Package e2e proves the whole mission on the machine's real Docker Engine:
// the connectable binary, real labelled containers running busybox clients,
// real backends on loopback, and service records served by dnsmasq.
//
// Every test here starts a daemon that acts on every labelled container the
// engine runs, so the tests run one at a time (no t.Parallel), and each
// container they start carries the label connectable.test=1 and is removed
// when its test ends.
package e2e

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
)

var binary string // the connectable binary under test, built by TestMain

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "connectable-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "connectable")
	build := exec.Command("go", "build", "-o", binary, "..")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "building connectable: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// prerequisites skips (or, in CI, fails) unless everything the end-to-end
// tests need is here, and guards the host's own rules.
func prerequisites(t *testing.T) {
	t.Helper()
	testenv.NeedRoot(t)
	testenv.NeedDocker(t)
	testenv.NeedCommand(t, "dnsmasq", "busybox", "nsenter", "iptables-save")
	testenv.GuardRootRules(t)
	// Every test here runs a daemon; registered after the guard, the lock
	// is released before the guard's final check, after every other
	// cleanup (containers, daemons) has run.
	testenv.LockDaemons(t)
}

// backend is a real HTTP server on loopback that answers with its name and
// counts what it served.
type backend struct {
	name string
	addr *net.TCPAddr
	srv  *http.Server
	ln   net.Listener

	mu    sync.Mutex
	hits  int
	first map[string]time.Time // path → first request
}

func startBackend(t *testing.T, name string) *backend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &backend{name: name, addr: ln.Addr().(*net.TCPAddr), ln: ln, first: map[string]time.Time{}}
	b.srv = &http.Server{Handler: b}
	go b.srv.Serve(ln)
	t.Cleanup(b.stop)
	return b
}

func (b *backend) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b.mu.Lock()
	b.hits++
	if _, ok := b.first[r.URL.Path]; !ok {
		b.first[r.URL.Path] = time.Now()
	}
	b.mu.Unlock()
	io.WriteString(w, b.name+"\n")
}

func (b *backend) stop() { b.srv.Close() }

func (b *backend) firstHit(path string) (time.Time, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	at, ok := b.first[path]
	return at, ok
}

func (b *backend) port() uint16 { return uint16(b.addr.Port) }

// service registers backends under an SRV name, each with its own target.
func service(name string, bs ...*backend) ([]testenv.SRV, map[string][]string) {
	var srvs []testenv.SRV
	hosts := map[string][]string{}
	for _, b := range bs {
		target := b.name + ".node.test"
		srvs = append(srvs, testenv.SRV{Name: name, Target: target, Port: b.port(), Priority: 1, Weight: 10})
		hosts[target] = []string{"127.0.0.1"}
	}
	return srvs, hosts
}

// webService starts the backend most tests need, named by
// web.service.test in a dnsmasq of its own, and returns the backend and
// dnsmasq's address.
func webService(t *testing.T) (*backend, string) {
	t.Helper()
	be := startBackend(t, "be")
	srvs, hosts := service("web.service.test", be)
	return be, testenv.Dnsmasq(t, srvs, hosts)
}

// daemon is one connectable process under test.
type daemon struct {
	t     *testing.T
	cmd   *exec.Cmd
	logs  *testenv.SyncBuffer
	done  chan struct{}
	admin string // the admin endpoint's address
}

// dataPathEnv names the environment variable that chooses the data path
// of the suite's daemons: "" (the daemon's default, auto: the socket path
// where it can serve, the relay beneath), relay, or socket. make test runs
// the suite in the default and in relay.
const dataPathEnv = "CONNECTABLE_E2E_DATAPATH"

// suiteDataPath returns the data path startDaemon runs daemons in: "" for
// the daemon's default.
func suiteDataPath(t *testing.T) string {
	t.Helper()
	switch v := os.Getenv(dataPathEnv); v {
	case "", "default", "auto":
		return ""
	case "relay", "socket":
		return v
	default:
		t.Fatalf("%s=%q: want relay, socket or nothing (the default)", dataPathEnv, v)
		return ""
	}
}

// startDaemon starts a daemon in the suite's data path (dataPathEnv).
// Most tests' clients cannot use the socket path (--network none, or
// backends on the host's loopback), so in the default and socket modes
// they prove that the relay beneath still serves what the socket path
// leaves to it.
func startDaemon(t *testing.T, dnsAddr string, extra ...string) *daemon {
	t.Helper()
	if p := suiteDataPath(t); p != "" && !slices.Contains(extra, "--datapath") {
		extra = append([]string{"--datapath", p}, extra...)
	}
	return startDaemonArgs(t, dnsAddr, extra...)
}

// startSocketDaemon starts a daemon with the socket data path, whatever
// the suite's, pinning in the test's bpf directory (bpfDir): a daemon
// started again in the same test adopts what the previous one left.
func startSocketDaemon(t *testing.T, dnsAddr string, extra ...string) *daemon {
	t.Helper()
	return startDaemonArgs(t, dnsAddr, append([]string{"--datapath", "socket", "--bpf-dir", bpfDir(t)}, extra...)...)
}

// bpfDirs holds, per top-level test, the pin directory of its daemons.
// Keyed by the top-level test's name, so that a subtest's restarted daemon
// (TestDaemonRestart) adopts what its parent's left.
var bpfDirs = struct {
	sync.Mutex
	m map[string]string
}{m: map[string]string{}}

// bpfDir returns the pin directory of the test's socket-path daemons, on
// a bpffs of its own mounted in a temporary directory: nothing a test
// pins can reach the host's /sys/fs/bpf or the next test. The bpffs is
// unmounted when the test that first asked ends, after the daemons it
// started meanwhile have stopped (cleanups run last-in first-out); the
// unmount drops what a SIGKILLed daemon left pinned, which detaches its
// programs.
func bpfDir(t *testing.T) string {
	t.Helper()
	root, _, _ := strings.Cut(t.Name(), "/")
	bpfDirs.Lock()
	defer bpfDirs.Unlock()
	if dir, ok := bpfDirs.m[root]; ok {
		return dir
	}
	mnt := filepath.Join(t.TempDir(), "bpffs")
	if err := os.Mkdir(mnt, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("bpf", mnt, "bpf", 0, "mode=0700"); err != nil {
		testenv.Skipf(t, "the socket data path needs a bpffs: mounting one at %s: %v", mnt, err)
	}
	dir := filepath.Join(mnt, "connectable")
	bpfDirs.m[root] = dir
	t.Cleanup(func() {
		bpfDirs.Lock()
		delete(bpfDirs.m, root)
		bpfDirs.Unlock()
		if err := syscall.Unmount(mnt, 0); err != nil {
			t.Errorf("unmounting the test's bpffs %s: %v", mnt, err)
			_ = syscall.Unmount(mnt, syscall.MNT_DETACH)
		}
	})
	return dir
}

// startDaemonArgs starts a daemon with the harness's flags and then extra.
func startDaemonArgs(t *testing.T, dnsAddr string, extra ...string) *daemon {
	t.Helper()
	admin := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	// The backends are on loopback, which the target policy denies by
	// default; a test that checks the policy passes its own flags after.
	args := append([]string{"--dns", dnsAddr, "--log-level", "debug", "--resync", "2s", "--admin", admin,
		"--allow-targets", "127.0.0.0/8"}, extra...)
	// The default data path (auto) loads the socket path's programs: its
	// pins go to the test's own bpffs, never the machine's /sys/fs/bpf.
	if !slices.Contains(extra, "--bpf-dir") && !slices.Contains(extra, "relay") {
		args = append(args, "--bpf-dir", bpfDir(t))
	}
	d := &daemon{t: t, cmd: exec.Command(binary, args...), logs: &testenv.SyncBuffer{}, done: make(chan struct{}), admin: admin}
	d.cmd.Stdout, d.cmd.Stderr = d.logs, d.logs
	if err := d.cmd.Start(); err != nil {
		t.Fatalf("starting connectable: %v", err)
	}
	go func() { _ = d.cmd.Wait(); close(d.done) }()
	t.Cleanup(func() {
		d.stop(syscall.SIGTERM)
		if t.Failed() {
			d.dumpLogs()
		}
	})
	return d
}

// logTail is how many of the daemon's last log lines a failed test prints.
// CI shows only the end of a failed test's output, and the test's own
// failure messages come before the logs: a whole churn's logs would push
// them out of sight.
const logTail = 60

// dumpLogs prints the end of the daemon's logs into the test's output and
// keeps all of them in a file, whose name it prints.
func (d *daemon) dumpLogs() {
	logs := d.logs.String()
	lines := strings.SplitAfter(strings.TrimSuffix(logs, "\n"), "\n")
	if len(lines) <= logTail {
		d.t.Logf("connectable logs:\n%s", logs)
		return
	}
	where := "not kept"
	if f, err := os.CreateTemp("", "connectable-e2e-*.log"); err == nil {
		_, werr := f.WriteString(logs)
		if cerr := f.Close(); werr == nil && cerr == nil {
			where = "all in " + f.Name()
		}
	}
	d.t.Logf("connectable logs, last %d of %d lines (%s):\n%s", logTail, len(lines), where, strings.Join(lines[len(lines)-logTail:], ""))
}

// stop signals the daemon and waits for it to exit; it returns the exit code.
func (d *daemon) stop(sig syscall.Signal) int {
	select {
	case <-d.done:
		return d.cmd.ProcessState.ExitCode()
	default:
	}
	_ = d.cmd.Process.Signal(sig)
	select {
	case <-d.done:
	case <-time.After(30 * time.Second):
		d.t.Errorf("connectable did not exit within 30s of %v; killing it", sig)
		_ = d.cmd.Process.Kill()
		<-d.done
	}
	return d.cmd.ProcessState.ExitCode()
}

// waitLog waits until the daemon's log holds substr.
func (d *daemon) waitLog(substr string, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if strings.Contains(d.logs.String(), substr) {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	return false
}

// container starts a labelled busybox container that sleeps, so tests can
// exec clients in it.
func container(t *testing.T, args ...string) string {
	t.Helper()
	image := testenv.BusyboxImage(t)
	return testenv.RunContainer(t, append(args, image, "sleep", "3600")...)
}

// fetch runs a bounded busybox wget inside the container and returns the
// body, or the error with wget's output.
func fetch(t *testing.T, id, url string) (string, error) {
	t.Helper()
	out, err := exec.Command("docker", "exec", id, "timeout", "10", "wget", "-q", "-O", "-", url).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("wget %s in %.12s: %v: %s", url, id, err, bytes.TrimSpace(out))
	}
	return strings.TrimSpace(string(out)), nil
}

// fetchMany makes n requests from one shell inside the container and returns
// the body of each, in order; a failed request yields "FAIL".
func fetchMany(t *testing.T, id, url string, n int) []string {
	t.Helper()
	script := fmt.Sprintf(`i=0; while [ $i -lt %d ]; do timeout 10 wget -q -O - %s || echo FAIL; i=$((i+1)); done`, n, url)
	out, err := exec.Command("docker", "exec", id, "sh", "-c", script).CombinedOutput()
	if err != nil {
		t.Fatalf("requests in %.12s: %v: %s", id, err, out)
	}
	var bodies []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		bodies = append(bodies, sc.Text())
	}
	return bodies
}

// eventually polls cond until it is true or timeout passes.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var err error
	for time.Now().Before(deadline) {
		if err = cond(); err == nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s: not within %v: %v", what, timeout, err)
}

// pid returns the container's main process ID on the host.
func pid(t *testing.T, id string) int {
	t.Helper()
	out := testenv.Run(t, "docker", "inspect", "-f", "{{.State.Pid}}", id)
	p, err := strconv.Atoi(strings.TrimSpace(out))
	if err != nil || p == 0 {
		t.Fatalf("pid of %.12s: %q", id, out)
	}
	return p
}

// rulesIn returns the nat table of one family (iptables or ip6tables) from
// inside the container's namespace, saved with the host's binaries.
func rulesIn(t *testing.T, id, family, backend string) string {
	t.Helper()
	ns := fmt.Sprintf("/proc/%d/ns/net", pid(t, id))
	return testenv.Exec(t, ns, family+"-"+backend+"-save", "-t", "nat")
}

// listenersIn returns the TCP listening sockets inside a container's
// namespace, as `ss -ltn` prints them.
func listenersIn(t *testing.T, id string) string {
	t.Helper()
	return testenv.Exec(t, fmt.Sprintf("/proc/%d/ns/net", pid(t, id)), "ss", "-ltnH")
}
