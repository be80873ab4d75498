package e2e

import (
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/connectable/connectable/admin"
	"github.com/connectable/connectable/internal/testenv"
)

// The core cases against Podman through its Docker-compatible API (issue
// 15): a real rootful `podman system service` of the test's own, which the
// daemon reaches with --docker-host as a user would with DOCKER_HOST.
// Containers use --network none, a namespace the test made (ns:<path>) or
// a pod's; never podman's default bridge, whose netavark backend adds nat
// rules to the machine's own namespace (prerequisites' guard would see
// them).

// podmanResync is the daemon's resync interval in these tests: far beyond
// any test's length, so that only the engine's events can explain what
// the daemon does after its start.
const podmanResync = time.Hour

// podmanGone bounds how long a stopped or removed container's namespace may
// stay in the daemon's /status and listeners. Measured on the shared 2-core
// machine: 2-240 ms after the podman command returned (the daemon often
// finishes first: the event comes before podman's own clean-up ends). The
// bound is loose for slow machines yet far below the resync interval, and the
// resync and reconnection counters are checked as well.
const podmanGone = 10 * time.Second

// TestPodman runs the core cases of the Docker suite against Podman.
func TestPodman(t *testing.T) {
	testenv.NeedPodman(t)
	testenv.NeedCommand(t, "dnsmasq", "busybox", "nsenter", "ss", "iptables-nft-save")
	testenv.GuardRootRules(t)
	testenv.LockDaemons(t)

	p := testenv.StartPodman(t)
	a, b, c := startBackend(t, "a"), startBackend(t, "b"), startBackend(t, "c")
	srvs, hosts := service("web.service.test", a, b)
	srvs2, hosts2 := service("pod.service.test", c)
	for k, v := range hosts2 {
		hosts[k] = v
	}
	dns := testenv.Dnsmasq(t, append(srvs, srvs2...), hosts)
	d := startDaemon(t, dns, "--docker-host", p.Host, "--resync", podmanResync.String())
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("podman system service logs:\n%s", p.Logs())
		}
	})
	eventually(t, 30*time.Second, "the daemon follows podman's events", func() error {
		code, body, err := get(d.admin, "/healthz")
		if err == nil && code != http.StatusOK {
			err = fmt.Errorf("/healthz: %d %s", code, body)
		}
		return err
	})

	t.Run("network none, two backends, IPv6", func(t *testing.T) {
		id := p.Run(t, "--network", "none", "-l", "connect.6000=web.service.test", p.Image, "sleep", "3600")
		waitPodmanServed(t, p, id, "http://localhost:6000/")
		seen := map[string]int{}
		for _, body := range podmanFetchMany(t, p, id, "http://localhost:6000/", 40) {
			seen[body]++
		}
		// 40 requests over 2 backends: fewer than 5 for one is below 1e-6
		// for a fair shuffle.
		if seen["a"] < 5 || seen["b"] < 5 || seen["a"]+seen["b"] != 40 {
			t.Errorf("requests through localhost:6000: %v; want 40, shared by a and b", seen)
		}
		// Podman, unlike Docker 20.10, leaves ::1 on a container's lo.
		if got, err := podmanFetch(p, id, "http://[::1]:6000/"); err != nil || (got != "a" && got != "b") {
			t.Errorf("[::1]:6000 = %q, %v; want a or b", got, err)
		}
	})

	t.Run("namespace of the test", func(t *testing.T) {
		ns := testenv.NewNetNS(t)
		id := p.Run(t, "--network", "ns:"+ns, "-l", "connect.6000=web.service.test", p.Image, "sleep", "3600")
		waitPodmanServed(t, p, id, "http://localhost:6000/")
		if body, err := getIn(ns, "http://127.0.0.1:6000/"); err != nil || (body != "a" && body != "b") {
			t.Errorf("from the namespace itself: %q, %v; want a or b", body, err)
		}
		// The namespace outlives the container: what the daemon put in it
		// must go with the container.
		base := podmanCounters(t, d)
		if _, err := p.Command("rm", "-f", "-t", "0", id); err != nil {
			t.Fatal(err)
		}
		took := waitPodmanGone(t, d, id, nil)
		t.Logf("rm -f: namespace dropped %v after podman rm returned", took.Round(time.Millisecond))
		eventually(t, podmanGone, "listener and rules gone from the namespace", func() error {
			if ln := strings.TrimSpace(testenv.Exec(t, ns, "ss", "-ltnH")); ln != "" {
				return fmt.Errorf("listeners left:\n%s", ln)
			}
			for _, family := range []string{"iptables", "ip6tables"} {
				if rules := testenv.Exec(t, ns, family+"-nft-save", "-t", "nat"); strings.Contains(rules, "CONNECTABLE") {
					return fmt.Errorf("%s rules left:\n%s", family, rules)
				}
			}
			return nil
		})
		checkEventsOnly(t, d, base)
	})

	t.Run("pod of two labelled containers", func(t *testing.T) {
		pod := p.Pod(t, "--network", "none")
		m1 := p.Run(t, "--pod", pod, "-l", "connect.6000=web.service.test", p.Image, "sleep", "3600")
		m2 := p.Run(t, "--pod", pod, "-l", "connect.6001=pod.service.test", p.Image, "sleep", "3600")
		// Each member reaches its own label's service and the other's.
		for _, tc := range []struct{ from, url string }{{m1, "http://localhost:6001/"}, {m2, "http://localhost:6000/"}} {
			waitPodmanServed(t, p, tc.from, tc.url)
		}
		if got, err := podmanFetch(p, m1, "http://localhost:6001/"); err != nil || got != "c" {
			t.Errorf("the other member's label from m1: %q, %v; want c", got, err)
		}
		infra, err := p.Command("pod", "inspect", "--format", "{{.InfraContainerID}}", pod)
		if err != nil {
			t.Fatal(err)
		}
		st := status(t, d)
		ns := namespaceWith(st, m1)
		if ns == nil || namespaceWith(st, m2) != ns {
			t.Fatalf("/status: the members are not in one namespace: %+v", st.Namespaces)
		}
		if key := strings.TrimSpace(string(infra)); !strings.HasPrefix(key, ns.Key) {
			t.Errorf("namespace key %s; want the infra container %.12s", ns.Key, key)
		}
		if len(ns.Routes) != 2 {
			t.Errorf("routes %+v; want 6000 and 6001", ns.Routes)
		}

		base := podmanCounters(t, d)
		inodes := podmanListenerInodes(t, p, m1)
		if _, err := p.Command("pod", "stop", "-t", "0", pod); err != nil {
			t.Fatal(err)
		}
		// Each member's death is its own event: when the infra container
		// dies first, the members still running are briefly namespaces of
		// their own.
		took := waitPodmanGone(t, d, m1, inodes)
		took += waitPodmanGone(t, d, m2, nil)
		t.Logf("pod stop: namespace dropped %v after podman pod stop returned", took.Round(time.Millisecond))
		checkEventsOnly(t, d, base)
	})

	t.Run("stop and removal", func(t *testing.T) {
		id := p.Run(t, "--network", "none", "-l", "connect.6000=web.service.test", p.Image, "sleep", "3600")
		waitPodmanServed(t, p, id, "http://localhost:6000/")
		base := podmanCounters(t, d)
		inodes := podmanListenerInodes(t, p, id)
		if _, err := p.Command("stop", "-t", "0", id); err != nil {
			t.Fatal(err)
		}
		took := waitPodmanGone(t, d, id, inodes)
		t.Logf("stop: namespace and listeners dropped %v after podman stop returned", took.Round(time.Millisecond))

		if _, err := p.Command("start", id); err != nil {
			t.Fatal(err)
		}
		waitPodmanServed(t, p, id, "http://localhost:6000/")
		inodes = podmanListenerInodes(t, p, id)
		if _, err := p.Command("rm", "-f", "-t", "0", id); err != nil {
			t.Fatal(err)
		}
		took = waitPodmanGone(t, d, id, inodes)
		t.Logf("rm -f: namespace and listeners dropped %v after podman rm returned", took.Round(time.Millisecond))
		checkEventsOnly(t, d, base)
	})

	t.Run("restart of connectable", func(t *testing.T) {
		id := p.Run(t, "--network", "none", "-l", "connect.6000=web.service.test", "-l", "connect.6001=web.service.test",
			p.Image, "sleep", "3600")
		waitPodmanServed(t, p, id, "http://localhost:6000/")
		ns := fmt.Sprintf("/proc/%d/ns/net", podmanPid(t, p, id))
		for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
			before := ruleLines(testenv.Exec(t, ns, "iptables-nft-save", "-t", "nat"))
			code := d.stop(sig)
			if sig == syscall.SIGTERM && code != 0 {
				t.Errorf("exit code after SIGTERM = %d, want 0", code)
			}
			if after := ruleLines(testenv.Exec(t, ns, "iptables-nft-save", "-t", "nat")); after != before {
				t.Errorf("after %v the rules changed; want them kept for the next start:\nbefore:\n%s\nafter:\n%s", sig, before, after)
			}
			start := time.Now()
			d = startDaemon(t, dns, "--docker-host", p.Host, "--resync", podmanResync.String())
			waitPodmanServed(t, p, id, "http://localhost:6001/")
			t.Logf("after %v: served again %v after the new start", sig, time.Since(start).Round(time.Millisecond))
			for _, family := range []string{"iptables", "ip6tables"} {
				rules := testenv.Exec(t, ns, family+"-nft-save", "-t", "nat")
				for _, port := range []string{"6000", "6001"} {
					if n := strings.Count(rules, "--dport "+port+" "); n != 1 {
						t.Errorf("after %v: %s rule for port %s appears %d times, want 1:\n%s", sig, family, port, n, rules)
					}
				}
			}
		}
	})
}

// podmanFetch runs a bounded busybox wget inside a podman container and
// returns the body.
func podmanFetch(p *testenv.Podman, id, url string) (string, error) {
	out, err := p.Command("exec", id, "timeout", "10", "wget", "-q", "-O", "-", url)
	return strings.TrimSpace(string(out)), err
}

// podmanFetchMany makes n requests from one shell inside the container and
// returns the body of each; a failed request yields "FAIL".
func podmanFetchMany(t *testing.T, p *testenv.Podman, id, url string, n int) []string {
	t.Helper()
	script := fmt.Sprintf(`i=0; while [ $i -lt %d ]; do timeout 10 wget -q -O - %s || echo FAIL; i=$((i+1)); done`, n, url)
	out, err := p.Command("exec", id, "sh", "-c", script)
	if err != nil {
		t.Fatalf("requests in %.12s: %v", id, err)
	}
	return strings.Fields(string(out))
}

func waitPodmanServed(t *testing.T, p *testenv.Podman, id, url string) {
	t.Helper()
	eventually(t, 30*time.Second, fmt.Sprintf("%s from %.12s", url, id), func() error {
		_, err := podmanFetch(p, id, url)
		return err
	})
}

func podmanPid(t *testing.T, p *testenv.Podman, id string) int {
	t.Helper()
	out, err := p.Command("inspect", "--format", "{{.State.Pid}}", id)
	pid, perr := strconv.Atoi(strings.TrimSpace(string(out)))
	if err != nil || perr != nil || pid == 0 {
		t.Fatalf("pid of %.12s: %q, %v", id, out, err)
	}
	return pid
}

// podmanListenerInodes returns the socket inodes of the listeners in a
// running container's namespace: the daemon's, since the container's own
// command listens on nothing.
func podmanListenerInodes(t *testing.T, p *testenv.Podman, id string) []string {
	t.Helper()
	out := testenv.Exec(t, fmt.Sprintf("/proc/%d/ns/net", podmanPid(t, p, id)), "ss", "-ltnHe")
	var inodes []string
	for _, m := range inoRE.FindAllStringSubmatch(out, -1) {
		inodes = append(inodes, m[1])
	}
	if len(inodes) == 0 {
		t.Fatalf("no listener in %.12s's namespace:\n%s", id, out)
	}
	return inodes
}

// namespaceWith returns the namespace of /status that lists container id.
func namespaceWith(st admin.Status, id string) *admin.Namespace {
	for i, ns := range st.Namespaces {
		if slices.ContainsFunc(ns.Containers, func(c admin.Container) bool { return strings.HasPrefix(id, c.ID) }) {
			return &st.Namespaces[i]
		}
	}
	return nil
}

// waitPodmanGone waits, polling closely, until /status no longer lists
// container id and the daemon holds none of the listener sockets inodes,
// and returns how long that took. It fails the test after podmanGone.
func waitPodmanGone(t *testing.T, d *daemon, id string, inodes []string) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		held := socketInodes(t, d.cmd.Process.Pid)
		left := slices.ContainsFunc(inodes, func(ino string) bool { return held[ino] })
		if !left && namespaceWith(status(t, d), id) == nil {
			return time.Since(start)
		}
		if time.Since(start) > podmanGone {
			t.Fatalf("%.12s still served %v after it ended (in /status: %v, listener held: %v)",
				id, podmanGone, namespaceWith(status(t, d), id) != nil, left)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// podmanCounters returns the daemon's resync and reconnection counters.
func podmanCounters(t *testing.T, d *daemon) [2]float64 {
	t.Helper()
	_, page, err := get(d.admin, "/metrics")
	if err != nil {
		t.Fatalf("/metrics: %v", err)
	}
	return [2]float64{metric(page, "connectable_docker_resyncs_total"), metric(page, "connectable_docker_reconnects_total")}
}

// checkEventsOnly fails the test if the daemon resynced or resubscribed
// since base was read: then a resync, not an event, may have done the work.
func checkEventsOnly(t *testing.T, d *daemon, base [2]float64) {
	t.Helper()
	if now := podmanCounters(t, d); now != base || base[0] < 1 {
		t.Errorf("resyncs, reconnects went from %v to %v; want them unchanged, so that only events explain the clean-up", base, now)
	}
}
