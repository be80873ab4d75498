package e2e

// Restarts: a stop and a start (an upgrade) refuse no connect, on the
// ports the socket path serves and on the relay's; one daemon owns a pin
// directory; `connectable cleanup` leaves nothing in the kernel nor in the
// containers' rules.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/connectable/connectable/internal/testenv"
)

// pinnedProgramIDs returns the ids of the programs the pinned links in dir
// run.
func pinnedProgramIDs(t *testing.T, dir string) []ebpf.ProgramID {
	t.Helper()
	pins, err := filepath.Glob(filepath.Join(dir, "link-*"))
	if err != nil || len(pins) == 0 {
		t.Fatalf("no pinned links in %s: %v", dir, err)
	}
	var ids []ebpf.ProgramID
	for _, pin := range pins {
		l, err := link.LoadPinnedLink(pin, nil)
		if err != nil {
			t.Fatalf("opening %s: %v", pin, err)
		}
		info, err := l.Info()
		l.Close()
		if err != nil {
			t.Fatalf("reading %s: %v", pin, err)
		}
		ids = append(ids, info.Program)
	}
	return ids
}

// TestRestartRefusesNoConnect: new connects every 20 ms through a SIGTERM
// of the daemon and the start of the next one all succeed on a port the
// socket path serves; then SIGTERM leaves the pins and `connectable
// cleanup` removes every pin, link and program.
func TestRestartRefusesNoConnect(t *testing.T) {
	prerequisites(t)
	network, _ := testNetwork(t, "198.18.196.0/24", true)
	httpdBackend(t, network, "198.18.196.10", "be")
	dns := testenv.Dnsmasq(t, []testenv.SRV{{Name: "web.service.test", Target: "be.node.test", Port: 8080, Priority: 1, Weight: 10}},
		map[string][]string{"be.node.test": {"198.18.196.10"}})
	dir := bpfDir(t)
	d := startSocketDaemon(t, dns)
	const clientIP = "198.18.196.20"
	client := container(t, "--network", network, "--ip", clientIP, "-l", "connect.6000=web.service.test")
	ns := netnsOf(t, client)
	waitPath(t, d, client, 6000, "socket", "ipv4") // the endpoint is IPv4: [::1] is the relay's
	url := "http://127.0.0.1:6000" + ipPath
	eventually(t, 30*time.Second, "the backend answers", func() error {
		_, err := getIn(ns, url)
		return err
	})

	load := connectLoad(ns, url)
	time.Sleep(time.Second)
	stopAt := time.Now()
	if code := d.stop(syscall.SIGTERM); code != 0 {
		t.Errorf("exit code after SIGTERM = %d, want 0", code)
	}
	stopped := time.Now()
	time.Sleep(2 * time.Second) // no daemon at all for a while
	startAt := time.Now()
	d = startSocketDaemon(t, dns)
	if !d.waitLog("connectable starting", 30*time.Second) {
		pid := d.cmd.Process.Pid
		wchan, _ := os.ReadFile(fmt.Sprintf("/proc/%d/wchan", pid))
		st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		stack, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stack", pid))
		t.Fatalf("the new daemon (PID %d) did not start within 30s: wchan %s\n%s\n%s", pid, wchan, st, stack)
	}
	waitPath(t, d, client, 6000, "socket", "ipv4") // the endpoint is IPv4: [::1] is the relay's
	ready := time.Now()
	time.Sleep(2 * time.Second)
	results := load()

	var failed, direct, gap int
	for _, r := range results {
		if r.at.After(stopAt) && r.at.Before(ready) {
			gap++
		}
		switch {
		case r.err != nil:
			failed++
			if failed <= 5 {
				t.Errorf("a connect %v after SIGTERM failed: %v", r.at.Sub(stopAt).Round(time.Millisecond), r.err)
			}
		case served(r.body) == "be "+clientIP:
			direct++
		}
	}
	t.Logf("restart: SIGTERM to exit %v, no daemon for %v, start to the port on the socket path in /status %v; "+
		"%d connects attempted (%d between SIGTERM and ready), %d failed, %d served straight by the kernel",
		stopped.Sub(stopAt).Round(time.Millisecond), startAt.Sub(stopped).Round(time.Millisecond), ready.Sub(startAt).Round(time.Millisecond),
		len(results), gap, failed, direct)
	if gap < 10 {
		t.Errorf("only %d connects while the daemon restarted; the load did not run", gap)
	}
	if !d.waitLog("adopted the socket path of a previous run", 5*time.Second) {
		t.Errorf("the new daemon did not log adopting the pins")
	}

	// SIGTERM leaves the socket path serving; cleanup removes it all.
	progs := pinnedProgramIDs(t, dir)
	if code := d.stop(syscall.SIGTERM); code != 0 {
		t.Errorf("exit code after SIGTERM = %d, want 0", code)
	}
	if body, err := getIn(ns, url); err != nil || served(body) != "be "+clientIP {
		t.Errorf("with the daemon stopped, a connect got %q, %v; want the kernel to serve it", body, err)
	}
	out, err := exec.Command(binary, "cleanup", "--bpf-dir", dir).CombinedOutput()
	if err != nil {
		t.Fatalf("connectable cleanup: %v: %s", err, out)
	}
	t.Logf("cleanup: %s", strings.TrimSpace(string(out)))
	if ents, err := os.ReadDir(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("after cleanup %s holds %v (%v); want it gone", dir, ents, err)
	}
	eventually(t, 10*time.Second, "the programs are freed after cleanup", func() error {
		for _, id := range progs {
			p, err := ebpf.NewProgramFromID(id)
			if err == nil {
				p.Close()
				return fmt.Errorf("program %d still exists", id)
			}
			if !errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("program %d: %v", id, err)
			}
		}
		return nil
	})
	if c, err := dialIn(ns, "127.0.0.1:6000", 2*time.Second); err == nil {
		c.Close()
		t.Errorf("after cleanup a connect to 127.0.0.1:6000 was still rewritten")
	}
	out, err = exec.Command(binary, "cleanup", "--bpf-dir", dir).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "nothing pinned") {
		t.Errorf("a second cleanup: %v: %s; want success with nothing pinned", err, out)
	}
}

// connectResult is one connect of connectLoad.
type connectResult struct {
	at   time.Time
	dur  time.Duration
	body string
	err  error
}

// connectLoad makes one new connection every 20 ms from inside ns, a GET
// of url each, on a goroutine of its own so that a slow one does not
// lower the rate, until the function it returns is called; that returns
// every result.
func connectLoad(ns, url string) (stop func() []connectResult) {
	var (
		mu      sync.Mutex
		results []connectResult
		reqs    sync.WaitGroup
	)
	done := make(chan struct{})
	loadDone := make(chan struct{})
	go func() {
		defer close(loadDone)
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-done:
				return
			case <-tick.C:
			}
			reqs.Go(func() {
				r := connectResult{at: time.Now()}
				r.body, r.err = getIn(ns, url)
				r.dur = time.Since(r.at)
				mu.Lock()
				results = append(results, r)
				mu.Unlock()
			})
		}
	}()
	return func() []connectResult {
		close(done)
		<-loadDone
		reqs.Wait()
		return results
	}
}

// TestRelayRestartRefusesNoConnect: a relay daemon restarted under load,
// SIGTERM while a connection lives, a second without a daemon, then the
// next start: every one of the new connects made every 20 ms succeeds.
// The drain serves them while the old connection lives; then the rules,
// which stay, hold them in SYN retries until the next start listens
// behind them (a second without a daemon keeps the wait within the
// client's second retransmission, 3 s, and its 5 s dial timeout).
// connectable cleanup then removes the rules.
func TestRelayRestartRefusesNoConnect(t *testing.T) {
	prerequisites(t)
	_, dns := webService(t)
	args := []string{"--datapath", "relay", "--drain-timeout", "3s"}
	d := startDaemon(t, dns, args...)
	id := container(t, "-l", "connect.6000=web.service.test")
	ns := netnsOf(t, id)
	const url = "http://127.0.0.1:6000/"
	eventually(t, 30*time.Second, "the backend answers", func() error {
		_, err := getIn(ns, url)
		return err
	})
	// A connection live at SIGTERM: the drain serves new ones until it
	// ends (here, at the drain timeout).
	live, err := dialIn(ns, "127.0.0.1:6000", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()

	load := connectLoad(ns, url)
	time.Sleep(time.Second)
	stopAt := time.Now()
	if code := d.stop(syscall.SIGTERM); code != 0 {
		t.Errorf("exit code after SIGTERM = %d, want 0", code)
	}
	stopped := time.Now()
	if !strings.Contains(d.logs.String(), "the relay's rules stay for the next start") {
		t.Errorf("the daemon did not log keeping its rules")
	}
	time.Sleep(time.Second) // no daemon at all for a while
	startAt := time.Now()
	d = startDaemon(t, dns, args...)
	eventually(t, 30*time.Second, "the new daemon serves", func() error {
		_, err := getIn(ns, url)
		return err
	})
	ready := time.Now()
	time.Sleep(2 * time.Second)
	results := load()

	var failed, gap, inDrain int
	var slowest time.Duration
	for _, r := range results {
		if r.at.After(stopAt) && r.at.Before(ready) {
			gap++
			slowest = max(slowest, r.dur)
		}
		if r.err != nil {
			failed++
			if failed <= 5 {
				t.Errorf("a connect %v after SIGTERM failed after %v: %v", r.at.Sub(stopAt).Round(time.Millisecond), r.dur.Round(time.Millisecond), r.err)
			}
		} else if r.at.After(stopAt) && r.at.Add(r.dur).Before(stopped) {
			inDrain++
		}
	}
	t.Logf("relay restart: SIGTERM to exit %v, no daemon for %v, start to served %v; %d connects (%d between SIGTERM and served, "+
		"%d of them answered by the draining daemon), %d failed, slowest of the gap %v",
		stopped.Sub(stopAt).Round(time.Millisecond), startAt.Sub(stopped).Round(time.Millisecond), ready.Sub(startAt).Round(time.Millisecond),
		len(results), gap, inDrain, failed, slowest.Round(time.Millisecond))
	if gap < 10 {
		t.Errorf("only %d connects while the daemon restarted; the load did not run", gap)
	}
	if inDrain == 0 {
		t.Errorf("no connect was answered between SIGTERM and the exit; want the drain to serve them while a connection lives")
	}
	rulesOnce(t, id, "6000")

	// Stopped for good: cleanup takes the rules out, and a connect is
	// refused at once again. Not while the daemon runs.
	noPins := filepath.Join(t.TempDir(), "none")
	out, err := exec.Command(binary, "cleanup", "--bpf-dir", noPins, "--admin", d.admin).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "a daemon answers on --admin "+d.admin) {
		t.Errorf("cleanup while the relay daemon runs: %v: %s; want a refusal naming its admin endpoint", err, out)
	}
	if code := d.stop(syscall.SIGTERM); code != 0 {
		t.Errorf("exit code after SIGTERM = %d, want 0", code)
	}
	out, err = exec.Command(binary, "cleanup", "--bpf-dir", noPins, "--admin", d.admin).CombinedOutput()
	if err != nil {
		t.Fatalf("connectable cleanup: %v: %s", err, out)
	}
	t.Logf("cleanup: %s", strings.TrimSpace(string(out)))
	if !strings.Contains(string(out), id[:12]) {
		t.Errorf("cleanup did not name the container %.12s: %s", id, out)
	}
	for _, table := range []string{"nat", "filter"} {
		for _, family := range []string{"iptables", "ip6tables"} {
			if rules := testenv.Exec(t, ns, family+"-nft-save", "-t", table); strings.Contains(rules, "CONNECTABLE") {
				t.Errorf("%s %s rules left after cleanup:\n%s", family, table, rules)
			}
		}
	}
	if c, err := dialIn(ns, "127.0.0.1:6000", 2*time.Second); err == nil || !errors.Is(err, syscall.ECONNREFUSED) {
		if c != nil {
			c.Close()
		}
		t.Errorf("a connect after cleanup: %v; want it refused at once", err)
	}
}

// TestRestartSecondDaemonRefused: a second daemon given the same
// --bpf-dir, in socket or auto mode, exits non-zero with a message naming
// the directory, and leaves the first serving; cleanup refuses while the
// first runs.
func TestRestartSecondDaemonRefused(t *testing.T) {
	prerequisites(t)
	_, dns := webService(t)
	dir := bpfDir(t)
	d := startSocketDaemon(t, dns)
	if !d.waitLog("the socket data path is on", 30*time.Second) {
		t.Fatal("the first daemon did not start the socket path")
	}
	for _, mode := range []string{"socket", "auto"} {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		cmd := exec.CommandContext(ctx, binary, "--dns", dns, "--datapath", mode, "--bpf-dir", dir,
			"--admin", fmt.Sprintf("127.0.0.1:%d", freePort(t)))
		out, err := cmd.CombinedOutput()
		timedOut := ctx.Err() != nil
		cancel()
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() == 0 || timedOut {
			t.Errorf("--datapath %s: a second daemon on %s ended with %v (timed out: %v); want a non-zero exit at once:\n%s", mode, dir, err, timedOut, out)
			continue
		}
		msg := string(out)
		for _, want := range []string{dir, "another connectable holds the pin directory", fmt.Sprintf("PID %d", d.cmd.Process.Pid), "one daemon per --bpf-dir"} {
			if !strings.Contains(msg, want) {
				t.Errorf("--datapath %s: the second daemon said %q; want it to name %q", mode, msg, want)
			}
		}
	}
	select {
	case <-d.done:
		t.Fatalf("the first daemon exited")
	default:
	}
	if _, err := os.Stat(filepath.Join(dir, "link-connect4")); err != nil {
		t.Errorf("the first daemon's link: %v", err)
	}
	out, err := exec.Command(binary, "cleanup", "--bpf-dir", dir).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "stop the daemon first") {
		t.Errorf("cleanup while a daemon runs: %v: %s; want a refusal", err, out)
	}
	if code := d.stop(syscall.SIGTERM); code != 0 {
		t.Errorf("exit code after SIGTERM = %d, want 0", code)
	}
	if out, err := exec.Command(binary, "cleanup", "--bpf-dir", dir).CombinedOutput(); err != nil {
		t.Errorf("cleanup after SIGTERM: %v: %s", err, out)
	}
}
