package e2e

import (
	"errors"
	"flag"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
)

// churnCycles is how many labelled containers TestChaosChurn starts and
// removes. make chaos passes -chaos.cycles=1000 (the figure); the
// default keeps make test short.
var churnCycles = flag.Int("chaos.cycles", 100, "start/stop cycles of TestChaosChurn (make chaos: 1000)")

// churnBatch is how many containers start (and then go) at once.
const churnBatch = 50

// TestChaosChurn starts and removes labelled containers in batches of 50
// while a long-lived container keeps being served, then checks the daemon
// is back to its baseline: descriptors, goroutines, listeners (sockets),
// namespaces, rules of the surviving container, and memory near where it
// was. The figures go to the log.
func TestChaosChurn(t *testing.T) {
	d, image, keeper, nsK, base := churnSetUp(t)

	tag := testenv.RandomName("churn-")
	t.Cleanup(func() { removeLabelled(t, "chaos.churn="+tag) })
	start := time.Now()
	served, failedRuns := 0, 0
	var peak figures
	for done := 0; done < *churnCycles; done += churnBatch {
		ids := runAtOnce(t, min(churnBatch, *churnCycles-done), func(i int) []string {
			return []string{"run", "-d", "--label", testenv.TestLabel, "--label", "chaos.churn=" + tag,
				"-l", "connect.6000=web.service.test", "-l", fmt.Sprintf("connect.%d=web.service.test", 7000+i),
				image, "sleep", "3600"}
		})
		var live []string
		for _, id := range ids {
			if id == "" {
				failedRuns++
			} else {
				live = append(live, id)
			}
		}
		// One container of each batch is served before the batch goes.
		if len(live) > 0 {
			if ns, err := netnsOfQuiet(live[len(live)-1]); err == nil {
				waitServed(t, ns, 6000, 30*time.Second)
				served++
			}
		}
		if f := measure(t, d); f.fds > peak.fds {
			peak = f
		}
		// One at a time: removing 50 at once once deadlocked this
		// machine's engine (see testenv.DockerTimeout).
		if err := testenv.RemoveContainers(live...); err != nil {
			t.Fatal(err)
		}
	}
	churnFor := time.Since(start)
	t.Logf("churn: %d start/stop cycles in batches of %d in %v (%d docker run failures); one per batch served (%d); peak %v",
		*churnCycles, churnBatch, churnFor.Round(time.Second), failedRuns, served, peak)

	eventually(t, 60*time.Second, "every churned namespace forgotten", func() error {
		f := measure(t, d)
		if f.namespaces != base.namespaces || f.ports != base.ports {
			return fmt.Errorf("%v", f)
		}
		return nil
	})
	settled := time.Now()
	settle(t, d, base, 2, 60*time.Second, "after churn")
	after := settleSockets(t, d, base, 30*time.Second, "after churn")
	t.Logf("after churn (settled in %v): %v", time.Since(settled).Round(time.Millisecond), after)
	t.Logf("memory: RSS %.1f → %.1f MiB, heap in use %.1f → %.1f MiB",
		base.rss/(1<<20), after.rss/(1<<20), base.heapInuse/(1<<20), after.heapInuse/(1<<20))
	// Near the baseline: the Go runtime keeps freed pages for a while, so
	// allow a few MiB on top of double.
	if after.heapInuse > 2*base.heapInuse+8<<20 {
		t.Errorf("heap in use after churn %.1f MiB; baseline %.1f MiB", after.heapInuse/(1<<20), base.heapInuse/(1<<20))
	}
	if after.rss > 2*base.rss+32<<20 {
		t.Errorf("RSS after churn %.1f MiB; baseline %.1f MiB", after.rss/(1<<20), base.rss/(1<<20))
	}
	rules := rulesIn(t, keeper, "iptables", "nft")
	if n := strings.Count(rules, "--dport 6000 "); n != 1 {
		t.Errorf("surviving container: rule for 6000 appears %d times:\n%s", n, rules)
	}
	if body := waitServed(t, nsK, 6000, 10*time.Second); body != "be" {
		t.Errorf("surviving container served by %q", body)
	}
}

// runAtOnce runs n docker commands at the same time, the i-th with args(i),
// and returns what each printed, trimmed; "" where one failed. A failure is
// part of the chaos, unless the engine stopped answering: then the test ends.
func runAtOnce(t *testing.T, n int, args func(i int) []string) []string {
	t.Helper()
	outs := make([]string, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			out, err := testenv.Docker(args(i)...)
			if errs[i] = err; err == nil {
				outs[i] = strings.TrimSpace(string(out))
			}
		})
	}
	wg.Wait()
	for _, err := range errs {
		if errors.Is(err, testenv.ErrDockerStuck) {
			t.Fatal(err)
		}
	}
	return outs
}

// netnsOfQuiet is netnsOf without failing the test.
func netnsOfQuiet(id string) (string, error) {
	out, err := testenv.Docker("inspect", "-f", "{{.State.Pid}}", id)
	if err != nil {
		return "", err
	}
	p := strings.TrimSpace(string(out))
	if p == "" || p == "0" {
		return "", fmt.Errorf("container %.12s not running", id)
	}
	return "/proc/" + p + "/ns/net", nil
}

// removeLabelled removes every container carrying label.
func removeLabelled(t *testing.T, label string) {
	out, err := testenv.Docker("ps", "-aq", "--filter", "label="+label)
	if err != nil {
		t.Error(err)
		return
	}
	// Containers run with --rm may be going away by themselves.
	if err := testenv.RemoveContainers(strings.Fields(string(out))...); err != nil {
		t.Logf("removing containers %s: %v", label, err)
	}
}

// TestChaosDyingContainers starts labelled containers that exit at once or
// within milliseconds, so they die while being set up or their namespace
// disappears between inspect and setns. Each must be logged and skipped, and
// nothing may be left: no state, descriptor or goroutine.
func TestChaosDyingContainers(t *testing.T) {
	d, image, _, nsK, base := churnSetUp(t)

	tag := testenv.RandomName("dying-")
	t.Cleanup(func() { removeLabelled(t, "chaos.dying="+tag) })
	scripts := []string{"exit 0", "usleep 1000", "usleep 5000", "usleep 20000", "usleep 50000"}
	const rounds, parallel = 8, 10
	start := time.Now()
	started := 0
	for r := range rounds {
		runAtOnce(t, parallel, func(i int) []string {
			args := []string{"run", "-d", "--label", testenv.TestLabel, "--label", "chaos.dying=" + tag,
				"-l", "connect.6000=web.service.test"}
			if i%2 == 0 {
				args = append(args, "--rm")
			}
			return append(args, image, "sh", "-c", scripts[(r+i)%len(scripts)])
		})
		started += parallel
	}
	t.Logf("%d containers that die within 0-50ms of starting, started in %v", started, time.Since(start).Round(time.Millisecond))
	removeLabelled(t, "chaos.dying="+tag)

	eventually(t, 60*time.Second, "no state left for the dead containers", func() error {
		f := measure(t, d)
		if f.namespaces != base.namespaces || f.ports != base.ports {
			return fmt.Errorf("%v", f)
		}
		if n := len(status(t, d).Namespaces); n != int(base.namespaces) {
			return fmt.Errorf("%d namespaces in /status", n)
		}
		return nil
	})
	settle(t, d, base, 2, 60*time.Second, "after dying containers")
	t.Logf("after: %v", settleSockets(t, d, base, 30*time.Second, "after dying containers"))
	logs := d.logs.String()
	setupErrors := countLines(logs, "setting up namespace; retrying")
	notRunning := countLines(logs, "container not running")
	gone := countLines(logs, "container gone")
	t.Logf("log lines: %d set-up errors, %d 'container not running', %d 'container gone'", setupErrors, notRunning, gone)
	if setupErrors+notRunning+gone == 0 {
		t.Errorf("no log line about any of the %d dying containers", started)
	}
	if countLines(logs, "level=ERROR", "panic") > 0 || strings.Contains(logs, "goroutine ") {
		t.Errorf("the daemon panicked")
	}
	if body := waitServed(t, nsK, 6000, 10*time.Second); body != "be" {
		t.Errorf("the surviving container is served by %q", body)
	}
}

// churnSetUp starts a daemon and one labelled container that stays up
// throughout, waits until it is served, and measures the daemon's baseline.
func churnSetUp(t *testing.T) (d *daemon, image, keeper, nsK string, base figures) {
	t.Helper()
	prerequisites(t)
	be := startBackend(t, "be")
	srvs, hosts := service("web.service.test", be)
	d = startDaemon(t, testenv.Dnsmasq(t, srvs, hosts))
	image = testenv.BusyboxImage(t)
	keeper = container(t, "-l", "connect.6000=web.service.test")
	nsK = netnsOf(t, keeper)
	waitServed(t, nsK, 6000, 30*time.Second)
	base = baseline(t, d)
	t.Logf("baseline: %v", base)
	return d, image, keeper, nsK, base
}
