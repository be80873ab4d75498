// Package multihost runs the deployment connectable is made for on one
// machine: three simulated hosts, each a network namespace joined to a
// switch namespace (a Linux bridge), each with its own Docker Engine, a
// Consul server, the registrar and a connectable daemon; backends published
// with -P on every host and an application on host A that reaches them at
// localhost:6000. Nothing runs in, or changes, the machine's own network
// namespace.
//
// Addresses (198.18.0.0/15, used nowhere else in the tests): the switch is
// 198.18.210.0/24, host A is .11, B .12, C .13; each host's docker0 is
// 198.18.211-213.1/24.
package multihost

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
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
	"github.com/connectable/connectable/netns"
)

// consulBinary is where `make consul` (scripts/setup.sh) puts Consul.
const consulBinary = "/var/cache/connectable/consul-1.22.7"

// Binaries built by TestMain from the tree.
var bins struct {
	dir, connectable, register, tool string
}

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "connectable-multihost-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bins.dir = dir
	bins.connectable = filepath.Join(dir, "connectable")
	bins.register = filepath.Join(dir, "register")
	bins.tool = filepath.Join(dir, "mhtool")
	for out, pkg := range map[string]string{bins.connectable: "../..", bins.register: "../../internal/cmd/register", bins.tool: "./mhtool"} {
		build := exec.Command("go", "build", "-o", out, pkg)
		build.Env = append(os.Environ(), "CGO_ENABLED=0")
		if b, err := build.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "building %s: %v\n%s", pkg, err, b)
			os.RemoveAll(dir)
			os.Exit(1)
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// proc is a process of the bed (Consul, the registrar, connectable), in a
// process group of its own and stopped by its PID.
type proc struct {
	name string
	cmd  *exec.Cmd
	logs testenv.SyncBuffer
	done chan struct{}
}

func startProc(t testing.TB, name string, env []string, argv ...string) *proc {
	t.Helper()
	p := &proc{name: name, cmd: exec.Command(argv[0], argv[1:]...), done: make(chan struct{})}
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.Stdout, p.cmd.Stderr = &p.logs, &p.logs
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	go func() { _ = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		p.stop(syscall.SIGTERM, 30*time.Second)
		if t.Failed() {
			t.Logf("%s logs (last 40 lines):\n%s", name, tail(p.logs.String(), 40))
		}
	})
	return p
}

// stop signals the process and waits for it, killing it after grace.
func (p *proc) stop(sig syscall.Signal, grace time.Duration) {
	select {
	case <-p.done:
		return
	default:
	}
	_ = syscall.Kill(p.cmd.Process.Pid, sig)
	select {
	case <-p.done:
	case <-time.After(grace):
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.done
	}
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// host is one simulated host.
type host struct {
	name    string // A, B, C
	ns      string // its network namespace's path
	nsName  string
	addr    string // on the switch
	port    string // its port's name in the switch namespace
	bip     string
	engine  *testenv.Engine
	consul  *proc
	consulD string // Consul's data directory
	reg     *proc
	daemon  *proc
	bpfDir  string // the socket path's pins, on a bpffs of the bed's
	http    *http.Client
}

// bed is the three hosts and their switch.
type bed struct {
	t      *testing.T // the running (sub)test
	root   *testing.T // the test that owns the bed
	sw     string     // the switch namespace's path
	swName string
	hosts  []*host
}

// newBed builds the switch, the hosts, their engines and Consul servers and
// registrars. Daemons start with startDaemon.
func newBed(t *testing.T, engineArgs ...string) *bed {
	t.Helper()
	testenv.NeedRoot(t)
	testenv.NeedCommand(t, "dockerd", "docker", "nsenter", "ip", "busybox")
	if _, err := os.Stat(consulBinary); err != nil {
		testenv.Skipf(t, "needs a Consul binary at %s (make consul builds it): %v", consulBinary, err)
	}
	testenv.GuardRootRules(t)
	// No testenv.LockDaemons: these daemons follow the bed's own engines,
	// never the machine's, and their socket-path programs act only on the
	// namespaces in their own maps (checkOwnPath proves it for A's).

	b := &bed{t: t, root: t}
	b.sw = testenv.NewNetNS(t)
	b.swName = filepath.Base(b.sw)
	testenv.Exec(t, b.sw, "ip", "link", "add", "br0", "type", "bridge")
	testenv.Exec(t, b.sw, "ip", "link", "set", "br0", "up")
	for i, name := range []string{"A", "B", "C"} {
		h := &host{
			name: name,
			ns:   testenv.NewNetNS(t),
			addr: fmt.Sprintf("198.18.210.%d", 11+i),
			port: "sw" + name,
			bip:  fmt.Sprintf("198.18.%d.1/24", 211+i),
		}
		h.nsName = filepath.Base(h.ns)
		// Both ends made in the switch namespace, one moved to the host.
		testenv.Exec(t, b.sw, "ip", "link", "add", h.port, "type", "veth", "peer", "name", "eth0", "netns", h.nsName)
		testenv.Exec(t, b.sw, "ip", "link", "set", h.port, "master", "br0", "up")
		testenv.Exec(t, h.ns, "ip", "addr", "add", h.addr+"/24", "dev", "eth0")
		testenv.Exec(t, h.ns, "ip", "link", "set", "eth0", "up")
		h.http = nsHTTPClient(h.ns)
		b.hosts = append(b.hosts, h)
	}
	for _, h := range b.hosts {
		h.engine = testenv.StartEngine(t, testenv.EngineConfig{NetNS: h.ns, Bip: h.bip, Args: engineArgs})
		h.engine.ImportBusybox(t)
		t.Cleanup(func() {
			if t.Failed() {
				t.Logf("engine %s logs (last 20 lines):\n%s", h.name, tail(h.engine.Logs(), 20))
			}
		})
	}
	for _, h := range b.hosts {
		b.startConsul(h)
	}
	b.waitLeader(90 * time.Second)
	for _, h := range b.hosts {
		h.reg = startProc(t, "register "+h.name, []string{"DOCKER_HOST=" + h.engine.Host()},
			"nsenter", "--net="+h.ns, "--", bins.register, "-consul", "http://127.0.0.1:8500", "-ip", h.addr, "-resync", "2s")
	}
	return b
}

func (b *bed) host(name string) *host {
	for _, h := range b.hosts {
		if h.name == name {
			return h
		}
	}
	b.t.Fatalf("no host %s", name)
	return nil
}

// nsHTTPClient returns a client whose connections are made inside the
// network namespace at ns, for Consul's and the daemons' APIs on its
// loopback.
func nsHTTPClient(ns string) *http.Client {
	return &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			var c net.Conn
			err := netns.Do(ns, func() error {
				var d net.Dialer
				var err error
				c, err = d.DialContext(ctx, network, addr)
				return err
			})
			return c, err
		},
	}}
}

func (h *host) get(path string, v any) error {
	resp, err := h.http.Get("http://127.0.0.1" + path)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s: %s", path, resp.Status, strings.TrimSpace(string(body)))
	}
	return json.Unmarshal(body, v)
}

// consulConfig makes the servers elect quickly and serve DNS from any
// server: a loaded 2-core machine runs three of them.
const consulConfig = `performance { raft_multiplier = 1 }
dns_config { allow_stale = true }
`

func (b *bed) startConsul(h *host) {
	t := b.root
	if h.consulD == "" {
		h.consulD = t.TempDir()
		if err := os.WriteFile(filepath.Join(h.consulD, "bed.hcl"), []byte(consulConfig), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	args := []string{"nsenter", "--net=" + h.ns, "--", consulBinary, "agent", "-server", "-bootstrap-expect", "3",
		"-node", "host-" + strings.ToLower(h.name), "-bind", h.addr, "-client", "127.0.0.1",
		"-data-dir", filepath.Join(h.consulD, "data"), "-config-file", filepath.Join(h.consulD, "bed.hcl"),
		"-dns-port", "8600", "-http-port", "8500", "-grpc-port", "-1", "-log-level", "warn"}
	for _, o := range b.hosts {
		if o != h {
			args = append(args, "-retry-join", o.addr)
		}
	}
	h.consul = startProc(t, "consul "+h.name, nil, args...)
}

// waitLeader waits until every live server names one leader; it returns
// the leader's host.
func (b *bed) waitLeader(timeout time.Duration) *host {
	b.t.Helper()
	return b.waitNewLeader(nil, timeout)
}

// waitNewLeader is waitLeader for a leader other than old (nil: any).
func (b *bed) waitNewLeader(old *host, timeout time.Duration) *host {
	b.t.Helper()
	var leader *host
	eventually(b.t, timeout, "the Consul servers agree on a leader", func() error {
		seen := ""
		leader = nil
		for _, h := range b.hosts {
			if h.consul.exited() {
				continue
			}
			var l string
			if err := h.get(":8500/v1/status/leader", &l); err != nil {
				return err
			}
			if l == "" || (seen != "" && l != seen) {
				return fmt.Errorf("host %s names leader %q", h.name, l)
			}
			seen = l
		}
		addr, _, _ := strings.Cut(seen, ":")
		for _, h := range b.hosts {
			if h.addr == addr {
				leader = h
			}
		}
		if leader == nil {
			return fmt.Errorf("leader %q is no host of the bed", seen)
		}
		if leader == old {
			return fmt.Errorf("the servers still name %s's server", old.name)
		}
		return nil
	})
	return leader
}

// waitVoters waits until every Consul server is a voter in the Raft
// configuration. A server that was cut off is removed by autopilot (its
// dead-server clean-up) and comes back as a non-voter until it has been
// stable for server_stabilization_time (10 s): losing another server
// meanwhile loses the quorum.
func (b *bed) waitVoters(timeout time.Duration) {
	b.t.Helper()
	eventually(b.t, timeout, "every Consul server is a Raft voter", func() error {
		var cfg struct {
			Servers []struct {
				Node  string
				Voter bool
			}
		}
		if err := b.hosts[0].get(":8500/v1/operator/raft/configuration?stale", &cfg); err != nil {
			return err
		}
		voters := 0
		for _, s := range cfg.Servers {
			if s.Voter {
				voters++
			}
		}
		if voters != len(b.hosts) {
			return fmt.Errorf("raft configuration %+v", cfg.Servers)
		}
		return nil
	})
}

// startDaemon starts connectable on host h in the data path given.
func (b *bed) startDaemon(h *host, datapath string, extra ...string) {
	t := b.t
	t.Helper()
	args := []string{"nsenter", "--net=" + h.ns, "--", bins.connectable,
		"--docker-host", h.engine.Host(), "--dns", "127.0.0.1:8600", "--admin", "127.0.0.1:9876",
		"--resync", "5s", "--datapath", datapath}
	if datapath != "relay" {
		if h.bpfDir == "" {
			h.bpfDir = bpffs(t)
		}
		args = append(args, "--bpf-dir", h.bpfDir)
	}
	h.daemon = startProc(t, "connectable "+h.name, nil, append(args, extra...)...)
	eventually(t, 30*time.Second, "connectable on host "+h.name+" answers", func() error {
		if h.daemon.exited() {
			t.Fatalf("connectable on host %s exited:\n%s", h.name, tail(h.daemon.logs.String(), 30))
		}
		resp, err := h.http.Get("http://127.0.0.1:9876/healthz")
		if err != nil {
			return err
		}
		resp.Body.Close()
		return nil
	})
}

// bpffs mounts a bpffs of the test's own and returns a directory in it for
// one daemon's pins; unmounting it when the test ends drops what a killed
// daemon left pinned, which detaches its programs.
func bpffs(t *testing.T) string {
	t.Helper()
	mnt := filepath.Join(t.TempDir(), "bpffs")
	if err := os.Mkdir(mnt, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("bpf", mnt, "bpf", 0, "mode=0700"); err != nil {
		testenv.Skipf(t, "the socket data path needs a bpffs: mounting one at %s: %v", mnt, err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(mnt, 0); err != nil {
			t.Errorf("unmounting %s: %v", mnt, err)
			_ = syscall.Unmount(mnt, syscall.MNT_DETACH)
		}
	})
	return filepath.Join(mnt, "connectable")
}

// backend runs an instance of web on host h, published with -P, named
// name@H; it returns the container's ID.
func (b *bed) backend(h *host, name string) string {
	b.t.Helper()
	out, err := h.engine.Docker("run", "-d", "--name", "web-"+name, "-l", testenv.TestLabel, "-l", "SERVICE_NAME=web",
		"--expose", "80", "-P", "-v", bins.tool+":/mhtool:ro", testenv.BusyboxImageName,
		"/mhtool", "serve", "-name", name+"@"+h.name, "-port", "80")
	if err != nil {
		b.t.Fatal(err)
	}
	return strings.TrimSpace(string(out))
}

// app runs the application container on host A and returns its network
// namespace's path.
func (b *bed) app() string {
	b.t.Helper()
	h := b.host("A")
	out, err := h.engine.Docker("run", "-d", "--name", "app", "-l", testenv.TestLabel, "-l", "connect.6000=web.service.consul",
		testenv.BusyboxImageName, "sleep", "100000")
	if err != nil {
		b.t.Fatal(err)
	}
	id := strings.TrimSpace(string(out))
	pid, err := h.engine.Docker("inspect", "-f", "{{.State.Pid}}", id)
	if err != nil {
		b.t.Fatal(err)
	}
	return "/proc/" + strings.TrimSpace(string(pid)) + "/ns/net"
}

// instances returns the web instances Consul's DNS interface lists as
// healthy, as name@host:port strings sorted by host address, as asked of
// host h's agent.
func (h *host) instances() ([]string, error) {
	var entries []struct {
		Node    struct{ Node string }
		Service struct {
			Address string
			Port    int
		}
	}
	if err := h.get(":8500/v1/health/service/web?passing=1&stale", &entries); err != nil {
		return nil, err
	}
	var out []string
	for _, e := range entries {
		out = append(out, fmt.Sprintf("%s:%d", e.Service.Address, e.Service.Port))
	}
	return out, nil
}

// consulView says what h's agent knows of the cluster's members and of
// web's instances with their checks, for a failure message.
func (h *host) consulView() string {
	var members []struct {
		Name   string
		Status int
	}
	var entries []struct {
		Node    struct{ Node string }
		Service struct{ Port int }
		Checks  []struct{ CheckID, Status string }
	}
	var b strings.Builder
	if err := h.get(":8500/v1/agent/members", &members); err != nil {
		fmt.Fprintf(&b, "members: %v", err)
	} else {
		b.WriteString("members (serf status 1 alive, 3 left, 4 failed):")
		for _, m := range members {
			fmt.Fprintf(&b, " %s=%d", m.Name, m.Status)
		}
	}
	if err := h.get(":8500/v1/health/service/web?stale", &entries); err != nil {
		fmt.Fprintf(&b, "; instances: %v", err)
	} else {
		b.WriteString("; instances with checks:")
		for _, e := range entries {
			fmt.Fprintf(&b, " %s:%d", e.Node.Node, e.Service.Port)
			for _, c := range e.Checks {
				fmt.Fprintf(&b, "[%s %s]", c.CheckID, c.Status)
			}
		}
	}
	return b.String()
}

// eventually retries check until it returns nil or timeout passes.
func eventually(t testing.TB, timeout time.Duration, what string, check func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := check()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v: %v", what, timeout, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// cut drops host h's link at the switch: its peers' packets vanish with
// no reset, as if it lost power. restore brings it back.
func (b *bed) cut(h *host) { testenv.Exec(b.t, b.sw, "ip", "link", "set", h.port, "down") }

func (b *bed) restore(h *host) { testenv.Exec(b.t, b.sw, "ip", "link", "set", h.port, "up") }

// partition drops everything between hosts x and y in the switch, and
// nothing else; heal undoes it.
func (b *bed) partition(x, y *host) {
	b.t.Helper()
	rules := fmt.Sprintf(`table bridge mhpart {
  chain forward { type filter hook forward priority 0; policy accept;
    ether type arp accept
    ip saddr %s ip daddr %s drop
    ip saddr %s ip daddr %s drop
  }
}
`, x.addr, y.addr, y.addr, x.addr)
	cmd := exec.Command("nsenter", "--net="+b.sw, "--", "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		b.t.Fatalf("nft: %v: %s", err, out)
	}
}

func (b *bed) heal() { testenv.Exec(b.t, b.sw, "nft", "delete", "table", "bridge", "mhpart") }

// load is the load generator running in the application's namespace.
type load struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	done  chan struct{}
	mu    sync.Mutex
	reqs  []request
	longs []longEvent
	errs  testenv.SyncBuffer
}

type request struct {
	start time.Time
	dur   time.Duration
	ok    bool
	who   string // the instance's name, or the error
}

type longEvent struct {
	open bool // L, else E
	id   int
	at   time.Time
	who  string
	err  string
}

// startLoad starts mhtool load inside the application's namespace.
func startLoad(t *testing.T, appNS string, rate, long int) *load {
	t.Helper()
	l := &load{done: make(chan struct{})}
	l.cmd = exec.Command("nsenter", "--net="+appNS, "--", bins.tool, "load", "-addr", "127.0.0.1:6000",
		"-rate", fmt.Sprint(rate), "-long", fmt.Sprint(long))
	l.cmd.Stderr = &l.errs
	var err error
	if l.stdin, err = l.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	stdout, err := l.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := l.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(l.done)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			l.parse(sc.Text())
		}
		_ = l.cmd.Wait()
	}()
	t.Cleanup(l.stop)
	return l
}

func (l *load) stop() {
	l.stdin.Close()
	select {
	case <-l.done:
	case <-time.After(40 * time.Second):
		_ = l.cmd.Process.Kill()
		<-l.done
	}
}

func (l *load) parse(line string) {
	f := strings.Fields(line)
	ns := func(s string) time.Time {
		var n int64
		fmt.Sscan(s, &n)
		return time.Unix(0, n)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	switch {
	case len(f) == 5 && f[0] == "R":
		var d int64
		fmt.Sscan(f[2], &d)
		l.reqs = append(l.reqs, request{start: ns(f[1]), dur: time.Duration(d), ok: f[3] == "ok", who: f[4]})
	case len(f) == 4 && f[0] == "L":
		var id int
		fmt.Sscan(f[1], &id)
		l.longs = append(l.longs, longEvent{open: true, id: id, at: ns(f[2]), who: f[3]})
	case len(f) == 5 && f[0] == "E":
		var id int
		fmt.Sscan(f[1], &id)
		l.longs = append(l.longs, longEvent{id: id, at: ns(f[2]), who: f[3], err: f[4]})
	}
}

// since returns the requests started in [from, to).
func (l *load) between(from, to time.Time) []request {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []request
	for _, r := range l.reqs {
		if !r.start.Before(from) && r.start.Before(to) {
			out = append(out, r)
		}
	}
	return out
}

// answeredBy counts who answered the requests.
func answeredBy(rs []request) map[string]int {
	m := map[string]int{}
	for _, r := range rs {
		if r.ok {
			m[r.who]++
		} else {
			m["error"]++
		}
	}
	return m
}

// hostsOf returns the hosts that answered (the part after @).
func hostsOf(rs []request) map[string]int {
	m := map[string]int{}
	for _, r := range rs {
		if r.ok {
			_, h, _ := strings.Cut(r.who, "@")
			m[h]++
		}
	}
	return m
}
