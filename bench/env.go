package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/connectable/connectable/internal/testenv"

	"github.com/connectable/connectable/netns"
)

// Addresses (198.18.0.0/15, the benchmarking range) and ports. Only the
// namespaces this program creates, the client container's and, in the host
// placement, the machine's end of the run's one veth hold them.
const (
	hostNet      = "198.19.77.0/30"
	hostAddr     = "198.19.77.1" // the daemon's end of its veth to the backend (either placement): the relay dials from it
	beHostAddr   = "198.19.77.2" // backend end of it: what the SRV records name
	clientAddr   = "198.19.77.5" // client container's end of the client–backend veth
	beClientAddr = "198.19.77.6" // backend end of it: what direct, HAProxy and nginx dial

	webPort   = 80   // nginx, 1 KiB responses
	iperfPort = 5201 // iperf3 -s
	holdPort  = 9000 // holder: accepts, says "h", holds
	readyPort = 8081 // first-hit recorder for set-up latency

	// Labelled ports (connect.<port>=<service>) of the client container
	// and of the set-up latency containers.
	cWeb, cIperf, cHold, cReady = 18080, 15201, 19000, 18081
	// Loopback ports HAProxy and nginx listen on in the client container.
	hWeb, hIperf, hHold = 21080, 21201, 21900
	nWeb, nIperf, nHold = 22080, 22201, 22900
)

// The test image and label the repository's tests use (internal/testenv).
const (
	imageName = testenv.BusyboxImageName
	testLabel = "connectable.test"
	runLabel  = "connectable.bench" // value: the run's ID, for the final sweep
)

// contender is one way from the client to the backend.
type contender struct {
	name             string
	web, iperf, hold string        // host:port as the client namespace sees them
	pids             func() []int  // processes whose memory counts; nil: direct
	proc             func() *proc  // the process to check is alive; nil: direct or not running
	config           func() string // one line on how it is configured
	daemon           string        // the connectable daemon it needs: relayDaemon, socketDaemon or ""
}

// bench is one run: its world and its results.
type bench struct {
	cfg  *config
	id   string
	dir  string // configuration and logs of this run
	runs []*placementRun

	// The placement being measured, and the names of its world: tag is
	// the run's ID and the placement's initial, so that no name of one
	// placement's world meets the last one's while the kernel or the
	// engine is still removing it.
	placement   string
	tag         string
	hostNS      string // clean placement: where connectable and dnsmasq run
	beNS        string // where the backends run (and dnsmasq, in the host placement)
	machineVeth string // the run's one veth in the machine's namespace, if created
	docker      *dockerAPI
	lock        *os.File
	started     time.Time
	elapsed     time.Duration

	loadBefore, loadAfter string
	versions              [][2]string

	cleanupMu sync.Mutex
	cleanups  []cleanup

	clientID  string
	clientPID int
	clientNS  string // /proc/<pid>/ns/net of the client container

	haproxy, nginx, iperf *proc
	hold                  *holder
	hits                  *firstHits
	contenders            []contender

	daemon     *proc  // the connectable daemon running, if any
	daemonKind string // relayDaemon or socketDaemon
	daemonRuns int    // daemons started, to name their logs
	mvNet      string // the socket contender's macvlan Docker network
	abComplete int    // requests the last ab run completed

	res results
}

type cleanup struct {
	what string
	fn   func() error
}

func newBench(cfg *config) (*bench, error) {
	var raw [3]byte
	if _, err := rand.Read(raw[:]); err != nil {
		return nil, err
	}
	id := hex.EncodeToString(raw[:])
	dir, err := os.MkdirTemp("", "connectable-bench-"+id+"-")
	if err != nil {
		return nil, fmt.Errorf("creating work directory: %w", err)
	}
	bin, err := filepath.Abs(cfg.connectable)
	if err != nil {
		return nil, err
	}
	cfg.connectable = bin
	return &bench{
		cfg:    cfg,
		id:     id,
		dir:    dir,
		docker: newDockerAPI(),
	}, nil
}

// placementRun is what one placement of the daemon measured.
type placementRun struct {
	placement             string
	res                   results
	contenders            []contender
	loadBefore, loadAfter string
	elapsed               time.Duration
}

// startPlacement names the world of a placement and forgets the last one's
// (torn down by then).
func (b *bench) startPlacement(placement string) {
	b.placement = placement
	b.tag = b.id + placement[:1]
	b.hostNS, b.beNS = "cb-host-"+b.tag, "cb-be-"+b.tag
	b.machineVeth, b.mvNet = "", ""
	b.res = results{}
	b.contenders = nil
	b.daemon, b.daemonKind = nil, ""
	b.haproxy, b.nginx, b.iperf, b.hold, b.hits = nil, nil, nil, nil, nil
	b.clientID, b.clientPID, b.clientNS = "", 0, ""
}

// onCleanup registers fn to run at the end, last registered first.
func (b *bench) onCleanup(what string, fn func() error) {
	b.cleanupMu.Lock()
	defer b.cleanupMu.Unlock()
	b.cleanups = append(b.cleanups, cleanup{what, fn})
}

func (b *bench) runCleanups() {
	b.cleanupMu.Lock()
	cs := b.cleanups
	b.cleanups = nil
	b.cleanupMu.Unlock()
	for i := len(cs) - 1; i >= 0; i-- {
		if err := cs[i].fn(); err != nil {
			logf("clean-up: %s: %v", cs[i].what, err)
		}
	}
}

// lockDaemons takes the lock every test that runs a connectable daemon
// holds (internal/testenv/lock.go): a daemon acts on every labelled
// container of the one Docker Engine, so two at once would fight. It is
// held until the clean-up has removed this run's containers.
func (b *bench) lockDaemons(ctx context.Context) error {
	path := filepath.Join(os.TempDir(), "connectable-daemon-tests.lock")
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return fmt.Errorf("opening %s: %w", path, err)
	}
	deadline := time.Now().Add(b.cfg.lockWait)
	for said := false; ; said = true {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			break
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return fmt.Errorf("locking %s: %w", path, err)
		}
		if !said {
			logf("waiting for %s: another connectable daemon (a test run?) is running", path)
		}
		if time.Now().After(deadline) {
			f.Close()
			return fmt.Errorf("%s still held after %v", path, b.cfg.lockWait)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
	// Held across the placements; unlock releases it after the last
	// clean-up.
	b.lock = f
	return nil
}

// unlock releases the daemon lock, once the run's containers are gone.
func (b *bench) unlock() {
	if b.lock == nil {
		return
	}
	_ = unix.Flock(int(b.lock.Fd()), unix.LOCK_UN)
	b.lock.Close()
	b.lock = nil
}

// proc is a long-running process this run started, in a process group of
// its own: Ctrl-C reaches only the benchmark, which stops its children in
// order, and stopping nginx's group reaches its workers too.
type proc struct {
	name string
	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

func (b *bench) start(name string, argv ...string) (*proc, error) {
	logPath := filepath.Join(b.dir, name+".log")
	f, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		f.Close()
		close(p.done)
	}()
	b.onCleanup("stopping "+name, func() error { p.stop(); return nil })
	return p, nil
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop ends the process group this process leads: SIGTERM, then SIGKILL.
func (p *proc) stop() {
	if p.exited() {
		return
	}
	_ = syscall.Kill(-p.pid(), syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		logf("%s (pid %d) ignored SIGTERM for 15s; killing it", p.name, p.pid())
		_ = syscall.Kill(-p.pid(), syscall.SIGKILL)
		<-p.done
	}
}

func nsPath(name string) string { return "/var/run/netns/" + name }

// setup builds the world: namespaces and veths, backends, DNS, connectable,
// the client container and the two other proxies inside it.
func (b *bench) setup(ctx context.Context) error {
	if b.placement == placementClean {
		logf("setting up namespaces %s (the daemon's) and %s (the backends')", b.hostNS, b.beNS)
	} else {
		logf("setting up namespace %s (the backends'), one veth to it from the machine's namespace", b.beNS)
	}
	if err := b.network(ctx); err != nil {
		return err
	}
	if err := b.backends(ctx); err != nil {
		return err
	}
	if err := b.dns(ctx); err != nil {
		return err
	}
	if b.cfg.contenders[socketContender] {
		if err := b.mountsForSocket(); err != nil {
			return err
		}
	}
	if err := b.client(ctx); err != nil {
		return err
	}
	if b.cfg.contenders[socketContender] && b.cfg.workloads["setup"] {
		if err := b.macvlan(ctx); err != nil {
			return err
		}
	}
	if err := b.proxies(ctx); err != nil {
		return err
	}
	// Stopped before the namespaces and mounts go (clean-ups run last
	// registered first), so the socket daemon detaches and unpins itself.
	b.onCleanup("connectable daemon", b.stopDaemon)
	return b.check(ctx)
}

func runAll(ctx context.Context, steps ...[]string) error {
	for _, argv := range steps {
		if _, err := command(ctx, argv...); err != nil {
			return err
		}
	}
	return nil
}

// network creates the namespaces and the link from the daemon's namespace
// to the backend's. Every command names its namespace (ip -n, ip netns
// exec); in the machine's own, only the host placement's veth is created.
func (b *bench) network(ctx context.Context) error {
	nss := []string{b.beNS}
	if b.placement == placementClean {
		nss = append(nss, b.hostNS)
	}
	for _, ns := range nss {
		if _, err := command(ctx, "ip", "netns", "add", ns); err != nil {
			return err
		}
		ns := ns
		b.onCleanup("namespace "+ns, func() error {
			_, err := command(context.Background(), "ip", "netns", "del", ns)
			return err
		})
	}
	if err := runAll(ctx,
		[]string{"ip", "-n", b.beNS, "link", "set", "lo", "up"},
		// Short connections by the ten thousand: let clients reuse ports
		// in TIME_WAIT (per-namespace setting; never the machine's).
		[]string{"ip", "netns", "exec", b.beNS, "sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1"},
	); err != nil {
		return err
	}
	if b.placement == placementHost {
		_, _, err := b.machineLink(ctx)
		return err
	}
	vh, vb := "cb"+b.tag+"-hb", "cb"+b.tag+"-bh"
	return runAll(ctx,
		[]string{"ip", "-n", b.hostNS, "link", "set", "lo", "up"},
		[]string{"ip", "-n", b.hostNS, "link", "add", vh, "type", "veth", "peer", "name", vb, "netns", b.beNS},
		[]string{"ip", "-n", b.hostNS, "addr", "add", hostAddr + "/30", "dev", vh},
		[]string{"ip", "-n", b.beNS, "addr", "add", beHostAddr + "/30", "dev", vb},
		[]string{"ip", "-n", b.hostNS, "link", "set", vh, "up"},
		[]string{"ip", "-n", b.beNS, "link", "set", vb, "up"},
		[]string{"ip", "netns", "exec", b.hostNS, "sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1"},
	)
}

// backends starts nginx and iperf3 in the backend namespace, and the holder
// and first-hit recorder in this process, listening there.
func (b *bench) backends(ctx context.Context) error {
	conf := filepath.Join(b.dir, "backend-nginx.conf")
	if err := os.WriteFile(conf, []byte(backendNginxConf(b.dir)), 0o644); err != nil {
		return err
	}
	if _, err := b.start("backend-nginx", "ip", "netns", "exec", b.beNS,
		"nginx", "-c", conf, "-p", b.dir+"/", "-e", filepath.Join(b.dir, "backend-nginx.error.log")); err != nil {
		return err
	}
	if err := b.startIperf(); err != nil {
		return err
	}
	var err error
	if b.hold, err = startHolder(nsPath(b.beNS), fmt.Sprintf(":%d", holdPort)); err != nil {
		return err
	}
	b.onCleanup("holder", func() error { b.hold.close(); return nil })
	if b.hits, err = startFirstHits(nsPath(b.beNS), fmt.Sprintf(":%d", readyPort)); err != nil {
		return err
	}
	b.onCleanup("first-hit recorder", func() error { return b.hits.close() })
	for _, port := range []int{webPort, iperfPort} {
		if err := waitTCP(ctx, nsPath(b.beNS), fmt.Sprintf("127.0.0.1:%d", port), 15*time.Second); err != nil {
			return fmt.Errorf("backend on port %d: %w", port, err)
		}
	}
	return nil
}

func (b *bench) startIperf() error {
	var err error
	b.iperf, err = b.start("iperf3", "ip", "netns", "exec", b.beNS, "iperf3", "-s", "-p", strconv.Itoa(iperfPort))
	return err
}

// restartIperf replaces an iperf3 server that a failed test may have left
// busy.
func (b *bench) restartIperf(ctx context.Context) error {
	b.iperf.stop()
	if err := b.startIperf(); err != nil {
		return err
	}
	return waitTCP(ctx, nsPath(b.beNS), fmt.Sprintf("127.0.0.1:%d", iperfPort), 15*time.Second)
}

// dns starts dnsmasq where the daemon can ask it: on the loopback of the
// clean placement's namespace, or, in the host placement, on the backend's
// end of the veth (the machine's own port 53 is not the run's to take).
func (b *bench) dns(ctx context.Context) error {
	ns, listen := b.hostNS, "127.0.0.1"
	if b.placement == placementHost {
		ns, listen = b.beNS, beHostAddr
	}
	args := []string{"ip", "netns", "exec", ns, "dnsmasq", "--keep-in-foreground", "--no-resolv",
		"--no-hosts", "--conf-file=/dev/null", "--listen-address=" + listen, "--bind-interfaces",
		"--user=root", "--pid-file=", "--log-facility=-", "--port=53",
		"--host-record=be.bench.test," + beHostAddr}
	for name, port := range map[string]int{"web": webPort, "iperf": iperfPort, "hold": holdPort, "ready": readyPort} {
		args = append(args, fmt.Sprintf("--srv-host=%s.bench.test,be.bench.test,%d,1,10", name, port))
	}
	if _, err := b.start("dnsmasq", args...); err != nil {
		return err
	}
	if err := waitTCP(ctx, nsPath(ns), listen+":53", 15*time.Second); err != nil {
		return fmt.Errorf("dnsmasq: %w", err)
	}
	return nil
}

// dnsAddr is where the daemon asks for the SRV records.
func (b *bench) dnsAddr() string {
	if b.placement == placementHost {
		return beHostAddr + ":53"
	}
	return "127.0.0.1:53"
}

// client starts the labelled client container and gives it its veth to the
// backend namespace.
func (b *bench) client(ctx context.Context) error {
	if err := ensureImage(); err != nil {
		return err
	}
	// Swept by label at the end, whatever else failed.
	b.onCleanup("containers of this run", func() error { return b.docker.removeRun(context.Background(), b.id) })
	name := "cb-client-" + b.tag
	out, err := command(ctx, "docker", "run", "-d", "--network", "none", "--name", name,
		"--label", testLabel+"=1", "--label", runLabel+"="+b.id,
		"--label", fmt.Sprintf("connect.%d=web.bench.test", cWeb),
		"--label", fmt.Sprintf("connect.%d=iperf.bench.test", cIperf),
		"--label", fmt.Sprintf("connect.%d=hold.bench.test", cHold),
		imageName, "sleep", "3600")
	if err != nil {
		return err
	}
	b.clientID = strings.TrimSpace(out)
	if b.clientPID, err = b.docker.pid(ctx, b.clientID); err != nil {
		return err
	}
	b.clientNS = fmt.Sprintf("/proc/%d/ns/net", b.clientPID)
	vb, vc := "cb"+b.tag+"-bc", "cb"+b.tag+"-cb"
	in := []string{"nsenter", "--net=" + b.clientNS}
	return runAll(ctx,
		[]string{"ip", "-n", b.beNS, "link", "add", vb, "type", "veth", "peer", "name", vc, "netns", strconv.Itoa(b.clientPID)},
		[]string{"ip", "-n", b.beNS, "addr", "add", beClientAddr + "/30", "dev", vb},
		[]string{"ip", "-n", b.beNS, "link", "set", vb, "up"},
		append(in, "ip", "addr", "add", clientAddr+"/30", "dev", vc),
		append(in, "ip", "link", "set", vc, "up"),
		append(in, "sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1"),
		// The SRV records name the backend's other address; this route is
		// what lets the socket path send the client's connects straight
		// there, over the same veth direct uses. The relay dials from the
		// bench-host namespace and never takes it.
		append(in, "ip", "route", "add", hostNet, "via", beClientAddr),
	)
}

// proxies starts HAProxy and nginx inside the client container's namespace
// and names the four contenders.
func (b *bench) proxies(ctx context.Context) error {
	hcfg := filepath.Join(b.dir, "haproxy.cfg")
	if err := os.WriteFile(hcfg, []byte(haproxyConf()), 0o644); err != nil {
		return err
	}
	ncfg := filepath.Join(b.dir, "nginx-stream.conf")
	if err := os.WriteFile(ncfg, []byte(nginxStreamConf(b.dir)), 0o644); err != nil {
		return err
	}
	var err error
	if b.haproxy, err = b.start("haproxy", "nsenter", "--net="+b.clientNS, "haproxy", "-f", hcfg, "-db"); err != nil {
		return err
	}
	if b.nginx, err = b.start("nginx-stream", "nsenter", "--net="+b.clientNS, "nginx", "-c", ncfg,
		"-p", b.dir+"/", "-e", filepath.Join(b.dir, "nginx-stream.error.log")); err != nil {
		return err
	}
	hp := func(port int) string { return fmt.Sprintf("127.0.0.1:%d", port) }
	procs := func() string {
		if b.cfg.gomaxprocs > 0 {
			return fmt.Sprintf("GOMAXPROCS=%d", b.cfg.gomaxprocs)
		}
		return "GOMAXPROCS unset (connectable's default: half the CPUs, at least 1)"
	}
	// Read when the report is written, after the placement's world is gone.
	where, admin, dns := placementWhere(b.placement), b.adminAddr(), b.dnsAddr()
	if b.placement == placementClean {
		where += " (" + b.hostNS + ", entered with nsenter --net)"
		admin += " of that namespace"
	} else {
		admin += ", the machine's end of the run's veth"
	}
	b.contenders = []contender{
		{name: "direct", web: fmt.Sprintf("%s:%d", beClientAddr, webPort), iperf: fmt.Sprintf("%s:%d", beClientAddr, iperfPort),
			hold:   fmt.Sprintf("%s:%d", beClientAddr, holdPort),
			config: func() string { return "the client connects to the backend's veth address" }},
		{name: "HAProxy", web: hp(hWeb), iperf: hp(hIperf), hold: hp(hHold),
			pids: func() []int { return tree(b.haproxy.pid()) }, proc: func() *proc { return b.haproxy },
			config: func() string {
				return fmt.Sprintf("mode tcp, nbthread %d (= CPUs), no log directive, maxconn 8000, one server per listener, no checks", runtime.NumCPU())
			}},
		{name: "nginx", web: hp(nWeb), iperf: hp(nIperf), hold: hp(nHold),
			pids: func() []int { return tree(b.nginx.pid()) }, proc: func() *proc { return b.nginx },
			config: func() string {
				return "stream module, worker_processes auto (master + workers counted), no access log, error_log at level error, defaults otherwise"
			}},
		{name: "connectable", web: hp(cWeb), iperf: hp(cIperf), hold: hp(cHold), daemon: relayDaemon,
			pids: func() []int { return tree(b.daemon.pid()) }, proc: func() *proc { return b.running(relayDaemon) },
			config: func() string {
				return fmt.Sprintf("--datapath relay, the daemon %s; reached through localhost:<labelled port> and its REDIRECT, dials the backend from the daemon's namespace; "+
					"SRV records from dnsmasq at %s; --iptables nft, log level info, %s", where, dns, procs())
			}},
		{name: socketContender, web: hp(cWeb), iperf: hp(cIperf), hold: hp(cHold), daemon: socketDaemon,
			pids: func() []int { return tree(b.daemon.pid()) }, proc: func() *proc { return b.running(socketDaemon) },
			config: func() string {
				return fmt.Sprintf("the same daemon with --datapath socket, %s (pins on a bpffs of the run's own, admin on %s): "+
					"its eBPF programs send the client's connect() to localhost:<labelled port> straight to the endpoint "+
					"(the client namespace routes %s over its veth to the backend), the relay beneath as fallback; checked through /status "+
					"and connectable_socket_connects_total after every start and run; %s", where, admin, hostNet, procs())
			}},
	}
	var chosen []contender
	for _, c := range b.contenders {
		if b.cfg.contenders[c.name] {
			chosen = append(chosen, c)
		}
	}
	b.contenders = chosen
	return nil
}

// procOf returns c's process if it runs.
func procOf(c contender) *proc {
	if c.proc == nil {
		return nil
	}
	return c.proc()
}

// running returns the daemon if it is of kind.
func (b *bench) running(kind string) *proc {
	if b.daemonKind == kind {
		return b.daemon
	}
	return nil
}

// prepare starts the daemon c needs, unless it runs already.
func (b *bench) prepare(ctx context.Context, c contender) error {
	if c.daemon == "" {
		return nil
	}
	return b.useDaemon(ctx, c.daemon)
}

// check waits until every contender serves the 1 KiB body, so a broken set-up
// fails in seconds rather than as a table of zeros.
func (b *bench) check(ctx context.Context) error {
	for _, c := range b.contenders {
		if err := b.prepare(ctx, c); err != nil {
			return err
		}
		deadline := time.Now().Add(30 * time.Second)
		for {
			n, err := httpGet(b.clientNS, c.web)
			if err == nil && n == bodySize {
				break
			}
			if err == nil {
				err = fmt.Errorf("body of %d bytes, want %d", n, bodySize)
			}
			if p := procOf(c); p != nil && p.exited() {
				return fmt.Errorf("%s exited: %v (see %s)", c.name, p.err, filepath.Join(b.dir, p.name+".log"))
			}
			if time.Now().After(deadline) || ctx.Err() != nil {
				return fmt.Errorf("%s does not serve %s: %w", c.name, c.web, err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	logf("every contender serves the 1 KiB body")
	return nil
}

// httpGet makes one HTTP/1.0 request from inside the namespace at ns and
// returns the body's length.
func httpGet(ns, addr string) (int, error) {
	var c net.Conn
	err := netns.Do(ns, func() (err error) {
		c, err = net.DialTimeout("tcp", addr, 2*time.Second)
		return err
	})
	if err != nil {
		return 0, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, "GET / HTTP/1.0\r\nHost: bench\r\n\r\n"); err != nil {
		return 0, err
	}
	resp, err := io.ReadAll(c)
	if err != nil {
		return 0, err
	}
	i := strings.Index(string(resp), "\r\n\r\n")
	if i < 0 || !strings.HasPrefix(string(resp), "HTTP/1.1 200") {
		return 0, fmt.Errorf("not a 200 response: %.80q", resp)
	}
	return len(resp) - i - 4, nil
}

// waitTCP waits until addr accepts connections from inside ns.
func waitTCP(ctx context.Context, ns, addr string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		var c net.Conn
		err := netns.Do(ns, func() (err error) {
			c, err = net.DialTimeout("tcp", addr, time.Second)
			return err
		})
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// tree returns pid and all its descendants.
func tree(pid int) []int {
	children := map[int][]int{}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat := readFile("/proc/" + e.Name() + "/stat")
		// The command name may hold spaces: fields start after its ')'.
		i := strings.LastIndexByte(stat, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(stat[i+1:])
		if len(f) < 2 {
			continue
		}
		if ppid, err := strconv.Atoi(f[1]); err == nil {
			children[ppid] = append(children[ppid], p)
		}
	}
	out := []int{pid}
	for i := 0; i < len(out); i++ {
		out = append(out, children[out[i]]...)
	}
	return out
}

// memory returns the summed Rss and Pss of pids, in KiB.
func memory(pids []int) (rss, pss float64) {
	for _, pid := range pids {
		for _, l := range strings.Split(readFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid)), "\n") {
			f := strings.Fields(l)
			if len(f) < 2 {
				continue
			}
			v, _ := strconv.ParseFloat(f[1], 64)
			switch f[0] {
			case "Rss:":
				rss += v
			case "Pss:":
				pss += v
			}
		}
	}
	return rss, pss
}

// holder accepts connections, writes one byte to each (so the client knows
// the whole path is up) and holds them until the client closes.
type holder struct {
	ln    net.Listener
	mu    sync.Mutex
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

func startHolder(ns, addr string) (*holder, error) {
	h := &holder{conns: map[net.Conn]struct{}{}}
	err := netns.Do(ns, func() (err error) {
		h.ln, err = net.Listen("tcp", addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("holder: %w", err)
	}
	h.wg.Add(1)
	go h.serve()
	return h, nil
}

func (h *holder) serve() {
	defer h.wg.Done()
	for {
		c, err := h.ln.Accept()
		if err != nil {
			return
		}
		h.mu.Lock()
		h.conns[c] = struct{}{}
		h.mu.Unlock()
		h.wg.Add(1)
		go func() {
			defer h.wg.Done()
			if _, err := c.Write([]byte("h")); err == nil {
				_, _ = io.Copy(io.Discard, c)
			}
			c.Close()
			h.mu.Lock()
			delete(h.conns, c)
			h.mu.Unlock()
		}()
	}
}

// from counts the held connections whose peer address is ip.
func (h *holder) from(ip string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for c := range h.conns {
		if host, _, err := net.SplitHostPort(c.RemoteAddr().String()); err == nil && host == ip {
			n++
		}
	}
	return n
}

func (h *holder) count() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.conns)
}

func (h *holder) close() {
	h.ln.Close()
	h.mu.Lock()
	for c := range h.conns {
		c.Close()
	}
	h.mu.Unlock()
	h.wg.Wait()
}

// firstHits is an HTTP server that records when each path was first asked
// for: the moment a new container's first request came through.
type firstHits struct {
	srv    *http.Server
	mu     sync.Mutex
	seen   map[string]time.Time
	direct map[string]time.Time // first asked for from anywhere but the relay
	done   chan struct{}
}

func startFirstHits(ns, addr string) (*firstHits, error) {
	var ln net.Listener
	err := netns.Do(ns, func() (err error) {
		ln, err = net.Listen("tcp", addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("first-hit recorder: %w", err)
	}
	f := &firstHits{seen: map[string]time.Time{}, direct: map[string]time.Time{}, done: make(chan struct{})}
	f.srv = &http.Server{Handler: f, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		defer close(f.done)
		_ = f.srv.Serve(ln)
	}()
	return f, nil
}

func (f *firstHits) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	now := time.Now()
	// The relay dials from the bench-host namespace's address; the socket
	// path's connects come from the container's own.
	host, _, _ := net.SplitHostPort(r.RemoteAddr)
	via := "relay"
	f.mu.Lock()
	if _, ok := f.seen[r.URL.Path]; !ok {
		f.seen[r.URL.Path] = now
	}
	if host != hostAddr {
		via = "direct"
		if _, ok := f.direct[r.URL.Path]; !ok {
			f.direct[r.URL.Path] = now
		}
	}
	f.mu.Unlock()
	_, _ = io.WriteString(w, via+"\n")
}

func (f *firstHits) directAt(path string) (time.Time, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	t, ok := f.direct[path]
	return t, ok
}

func (f *firstHits) at(path string) (time.Time, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	t, ok := f.seen[path]
	return t, ok
}

func (f *firstHits) close() error {
	err := f.srv.Close()
	<-f.done
	return err
}

// printPause tells a person profiling by hand where everything is.
func (b *bench) printPause() {
	logf("paused; Ctrl-C cleans up. Client namespace: nsenter --net=%s <tool>", b.clientNS)
	for _, c := range b.contenders {
		pids := ""
		if c.pids != nil && (c.daemon == "" || c.daemon == b.daemonKind) {
			pids = fmt.Sprintf(", pids %v", c.pids())
		}
		logf("  %-18s web %s, iperf3 %s, hold %s%s", c.name, c.web, c.iperf, c.hold, pids)
	}
	if b.placement == placementClean {
		logf("  connectable (%s daemon) runs in namespace %s (nsenter --net=%s ...); the other contender's daemon is not running", b.daemonKind, b.hostNS, nsPath(b.hostNS))
	} else {
		logf("  connectable (%s daemon) runs in the machine's namespace; the other contender's daemon is not running", b.daemonKind)
	}
}
