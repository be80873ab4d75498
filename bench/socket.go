package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/connectable/connectable/netns"
)

// The socket data path's contender: the same daemon with --datapath socket.
// Only one daemon at a time may act on the engine's labelled containers (two
// would fight over the client's rules), so the run switches between them:
// useDaemon stops one and starts the other before a contender's turn.
const (
	relayDaemon  = "relay"
	socketDaemon = "socket"

	// The socket daemon's admin endpoint: /status says which path serves
	// each port, /metrics what the kernel counted. On the loopback of the
	// clean placement's namespace; in the host placement on the machine's
	// end of the run's veth, an address only this run holds (another
	// daemon on the machine may have the loopback port).
	adminPort = 19999

	// The set-up latency containers of the socket contender sit on a
	// macvlan Docker network whose parent is the one veth this run puts in
	// the machine's namespace; its peer, in the backend namespace, is their
	// gateway. Their frames pass the machine's namespace below IP. (A
	// --network none container has no route to any endpoint, so the
	// socket path would never serve it.)
	mvSubnet = "198.18.77.0/24"
	beMvAddr = "198.18.77.1"
)

// adminAddr is where the socket daemon serves /status and /metrics.
func (b *bench) adminAddr() string {
	if b.placement == placementHost {
		return fmt.Sprintf("%s:%d", hostAddr, adminPort)
	}
	return fmt.Sprintf("127.0.0.1:%d", adminPort)
}

// daemonArgs is the command line of one kind of daemon. Each names its data
// path: the daemon's default is not the relay for ever.
func (b *bench) daemonArgs(kind string) []string {
	admin := ""
	if kind == socketDaemon {
		admin = b.adminAddr()
	}
	argv := []string{b.cfg.connectable,
		"--dns", b.dnsAddr(), "--iptables", "nft", "--admin", admin, "--drain-timeout", "1s", "--datapath", kind}
	if kind == socketDaemon {
		argv = append(argv, "--bpf-dir", b.bpfDir())
	}
	if b.placement == placementClean {
		// nsenter, not ip netns exec: the daemon must stay in the
		// machine's mount namespace, where the engine keeps mounting new
		// containers' namespaces (ip netns exec's copy of the mounts
		// never sees them, and the daemon then refuses those containers)
		// and where the cgroup2 root is.
		argv = append([]string{"nsenter", "--net=" + nsPath(b.hostNS)}, argv...)
	}
	// The memory workload holds 2000 idle connections through one
	// namespace, above the default cap where the hard file limit is 20000.
	// An environment variable, not a flag, so that builds from before the
	// cap existed can be measured with the same harness.
	// env execs nsenter, which execs connectable: still one PID to measure.
	env := []string{"env", "CONNECTABLE_MAX_CONNS_PER_NAMESPACE=4096"}
	if b.cfg.gomaxprocs > 0 {
		env = append(env, fmt.Sprintf("GOMAXPROCS=%d", b.cfg.gomaxprocs))
	}
	return append(env, argv...)
}

func (b *bench) bpfDir() string { return filepath.Join(b.dir, "bpffs", "connectable") }

// useDaemon makes the daemon of kind the one running, and returns once it
// serves the client; for the socket daemon, once the kernel serves every
// labelled port of the client, or an error saying why not.
func (b *bench) useDaemon(ctx context.Context, kind string) error {
	if b.daemonKind == kind && b.daemon != nil && !b.daemon.exited() {
		return nil
	}
	if err := b.stopDaemon(); err != nil {
		return err
	}
	b.daemonRuns++
	name := fmt.Sprintf("connectable-%s-%d", kind, b.daemonRuns)
	p, err := b.start(name, b.daemonArgs(kind)...)
	if err != nil {
		return err
	}
	b.daemon, b.daemonKind = p, kind
	web := fmt.Sprintf("127.0.0.1:%d", cWeb)
	if err := waitFor(ctx, 30*time.Second, func() bool {
		n, err := httpGet(b.clientNS, web)
		return (err == nil && n == bodySize) || p.exited()
	}); err != nil || p.exited() {
		return fmt.Errorf("%s does not serve %s (see %s): %v", name, web, filepath.Join(b.dir, name+".log"), err)
	}
	if kind == socketDaemon {
		return b.checkSocketPath(ctx)
	}
	return nil
}

// stopDaemon stops the running daemon; after the socket daemon, nothing may
// be left pinned once `connectable cleanup` ran (SIGTERM leaves the socket
// path serving; builds from before cleanup existed removed it on SIGTERM).
func (b *bench) stopDaemon() error {
	if b.daemon == nil {
		return nil
	}
	b.daemon.stop()
	kind := b.daemonKind
	b.daemon, b.daemonKind = nil, ""
	if kind == socketDaemon {
		if left := pinsLeft(filepath.Dir(b.bpfDir())); len(left) > 0 {
			if out, err := exec.Command(b.cfg.connectable, "cleanup", "--bpf-dir", b.bpfDir()).CombinedOutput(); err != nil {
				return fmt.Errorf("connectable cleanup after the socket daemon: %v: %s", err, out)
			}
		}
		if left := pinsLeft(filepath.Dir(b.bpfDir())); len(left) > 0 {
			return fmt.Errorf("the socket daemon left pins behind after SIGTERM and cleanup: %s", strings.Join(left, ", "))
		}
	}
	return nil
}

// pinsLeft lists what is on the bpffs at dir, recursively, but for the
// iterators the kernel puts on every bpffs it mounts (bpf_preload).
func pinsLeft(dir string) []string {
	var left []string
	_ = filepath.WalkDir(dir, func(path string, _ os.DirEntry, err error) error {
		rel := strings.TrimPrefix(path, dir+"/")
		if err == nil && path != dir && rel != "maps.debug" && rel != "progs.debug" {
			left = append(left, rel)
		}
		return nil
	})
	return left
}

// mountsForSocket mounts the bpffs of the run's own that the socket daemon
// pins in.
func (b *bench) mountsForSocket() error {
	for _, m := range []struct{ dir, fstype string }{{filepath.Dir(b.bpfDir()), "bpf"}} {
		if err := os.MkdirAll(m.dir, 0o700); err != nil {
			return err
		}
		if err := unix.Mount(m.fstype, m.dir, m.fstype, 0, ""); err != nil {
			return fmt.Errorf("mount -t %s %s: %w", m.fstype, m.dir, err)
		}
		m := m
		b.onCleanup("umount "+m.dir, func() error {
			if m.fstype == "bpf" {
				if left := pinsLeft(m.dir); len(left) > 0 {
					logf("clean-up: the bpffs still holds %s; unmounting it drops them", strings.Join(left, ", "))
				}
			}
			return unix.Unmount(m.dir, 0)
		})
	}
	return nil
}

// macvlan puts a macvlan Docker network for the socket contender's set-up
// containers on the run's veth in the machine's namespace, with the veth's
// peer in the backend namespace as their gateway.
func (b *bench) macvlan(ctx context.Context) error {
	vm, vb, err := b.machineLink(ctx)
	if err != nil {
		return err
	}
	if _, err := command(ctx, "ip", "-n", b.beNS, "addr", "add", beMvAddr+"/24", "dev", vb); err != nil {
		return err
	}
	b.mvNet = "cb-mv-" + b.tag
	if _, err := command(ctx, "docker", "network", "create", "-d", "macvlan", "--subnet", mvSubnet, "--gateway", beMvAddr,
		"-o", "parent="+vm, "-o", "macvlan_mode=bridge", "--label", testLabel+"=1", "--label", runLabel+"="+b.id, b.mvNet); err != nil {
		return err
	}
	mvNet := b.mvNet
	b.onCleanup("docker network "+mvNet, func() error {
		// Containers left on it by a failed run go first.
		if err := b.docker.removeRun(context.Background(), b.id); err != nil {
			return err
		}
		_, err := command(context.Background(), "docker", "network", "rm", mvNet)
		return err
	})
	return nil
}

// adminGet fetches path from the socket daemon's admin endpoint, dialled
// from the daemon's namespace.
func (b *bench) adminGet(ctx context.Context, path string) ([]byte, error) {
	tr := &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		var d net.Dialer
		if b.placement == placementHost {
			return d.DialContext(ctx, network, addr)
		}
		var c net.Conn
		err := netns.Do(nsPath(b.hostNS), func() (err error) {
			c, err = d.DialContext(ctx, network, addr)
			return err
		})
		return c, err
	}}
	defer tr.CloseIdleConnections()
	cl := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	req, err := http.NewRequestWithContext(ctx, "GET", "http://"+b.adminAddr()+path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := cl.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err == nil && resp.StatusCode != http.StatusOK {
		err = fmt.Errorf("GET %s: %s", path, resp.Status)
	}
	return data, err
}

type routePath struct {
	Family, Path, Why string
	Endpoints         []string
}

// clientPaths returns, per labelled port of the client container, how its
// IPv4 connects are served according to /status.
func (b *bench) clientPaths(ctx context.Context) (map[uint16]routePath, error) {
	data, err := b.adminGet(ctx, "/status")
	if err != nil {
		return nil, err
	}
	// The last one read is kept with the logs, for when the check fails.
	_ = os.WriteFile(filepath.Join(b.dir, "socket-status.json"), data, 0o644)
	var st struct {
		Namespaces []struct {
			Containers []struct{ ID string }
			Routes     []struct {
				Port  uint16
				Paths []routePath
			}
		}
	}
	if err := json.Unmarshal(data, &st); err != nil {
		return nil, fmt.Errorf("/status: %w", err)
	}
	out := map[uint16]routePath{}
	for _, ns := range st.Namespaces {
		mine := false
		for _, c := range ns.Containers {
			// /status gives the short form.
			mine = mine || (c.ID != "" && strings.HasPrefix(b.clientID, c.ID))
		}
		if !mine {
			continue
		}
		for _, r := range ns.Routes {
			for _, p := range r.Paths {
				if p.Family == "ipv4" {
					out[r.Port] = p
				}
			}
		}
	}
	return out, nil
}

// checkSocketPath waits until /status says the kernel serves every labelled
// port of the client, then that one request really went through it: the
// kernel's counter of connects sent straight to an endpoint grows.
func (b *bench) checkSocketPath(ctx context.Context) error {
	ports := []uint16{cWeb, cIperf, cHold}
	var paths map[uint16]routePath
	var last error
	_ = waitFor(ctx, 30*time.Second, func() bool {
		paths, last = b.clientPaths(ctx)
		if last != nil {
			return false
		}
		for _, p := range ports {
			if paths[p].Path != "socket" {
				return false
			}
		}
		return true
	})
	if err := ctx.Err(); err != nil {
		return err
	}
	var bad []string
	for _, p := range ports {
		if rp := paths[p]; rp.Path != "socket" {
			bad = append(bad, fmt.Sprintf("port %d: path %q (%s)", p, rp.Path, rp.Why))
		}
	}
	if last != nil || len(bad) > 0 {
		return fmt.Errorf("CONTENDER FAILED: the socket daemon does not serve the client's ports through the kernel within 30 s, "+
			"refusing to benchmark the relay twice: %s %v", strings.Join(bad, "; "), last)
	}
	before, err := b.socketConnects(ctx)
	if err != nil {
		return err
	}
	if _, err := httpGet(b.clientNS, fmt.Sprintf("127.0.0.1:%d", cWeb)); err != nil {
		return err
	}
	after, err := b.socketConnects(ctx)
	if err != nil {
		return err
	}
	if after <= before {
		return fmt.Errorf("CONTENDER FAILED: /status says socket, but connectable_socket_connects_total stayed at %.0f over a request", before)
	}
	logf("socket daemon: ports %d, %d, %d served by the kernel, to %v", cWeb, cIperf, cHold, paths[cWeb].Endpoints)
	return nil
}

// socketConnects sums connectable_socket_connects_total over its series.
func (b *bench) socketConnects(ctx context.Context) (float64, error) {
	data, err := b.adminGet(ctx, "/metrics")
	if err != nil {
		return 0, err
	}
	sum, found := 0.0, false
	sc := bufio.NewScanner(strings.NewReader(string(data)))
	for sc.Scan() {
		l := sc.Text()
		if !strings.HasPrefix(l, "connectable_socket_connects_total") {
			continue
		}
		f := strings.Fields(l)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err != nil {
			return 0, fmt.Errorf("/metrics: %q: %w", l, err)
		}
		sum, found = sum+v, true
	}
	if !found && !strings.Contains(string(data), "connectable_socket_connects_total") {
		return 0, errors.New("/metrics has no connectable_socket_connects_total")
	}
	return sum, nil
}
