package e2e

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
)

// Case 1: three backends behind one name share the traffic, and two ports in
// one container reach two different services.
func TestBridgeBalanceAndTwoServices(t *testing.T) {
	prerequisites(t)
	a, b, c := startBackend(t, "a"), startBackend(t, "b"), startBackend(t, "c")
	other := startBackend(t, "other")
	srvs, hosts := service("web.service.test", a, b, c)
	srvs2, hosts2 := service("other.service.test", other)
	for k, v := range hosts2 {
		hosts[k] = v
	}
	dns := testenv.Dnsmasq(t, append(srvs, srvs2...), hosts)
	startDaemon(t, dns)

	id := container(t, "-l", "connect.6000=web.service.test", "-l", "connect.7000=other.service.test")
	eventually(t, 20*time.Second, "first request through localhost:6000", func() error {
		_, err := fetch(t, id, "http://localhost:6000/")
		return err
	})
	bodies := fetchMany(t, id, "http://localhost:6000/", 60)
	seen := map[string]int{}
	for _, body := range bodies {
		seen[body]++
	}
	if seen["FAIL"] > 0 || len(bodies) != 60 {
		t.Fatalf("requests through localhost:6000: %v", seen)
	}
	for _, name := range []string{"a", "b", "c"} {
		// 60 requests over 3 backends: each expects 20; fewer than 5 means
		// no real shuffle (probability below 1e-4 for a fair one).
		if seen[name] < 5 {
			t.Errorf("backend %s served %d of 60 requests; want a fair share (all: %v)", name, seen[name], seen)
		}
	}
	if got, err := fetch(t, id, "http://localhost:7000/"); err != nil || got != "other" {
		t.Errorf("localhost:7000 = %q, %v; want other", got, err)
	}
}

// Case 2: IPv6 loopback works as well as IPv4 (Docker 20.10 needs IPv6
// switched on inside the container).
func TestIPv6Loopback(t *testing.T) {
	prerequisites(t)
	be := startBackend(t, "v6")
	srvs, hosts := service("web.service.test", be)
	dns := testenv.Dnsmasq(t, srvs, hosts)
	startDaemon(t, dns)
	id := container(t, "--sysctl", "net.ipv6.conf.all.disable_ipv6=0", "-l", "connect.6000=web.service.test")
	for _, url := range []string{"http://127.0.0.1:6000/", "http://[::1]:6000/"} {
		eventually(t, 20*time.Second, url, func() error {
			got, err := fetch(t, id, url)
			if err == nil && got != "v6" {
				err = fmt.Errorf("got %q", got)
			}
			return err
		})
	}
}

// Case 3: user-defined networks, --network none, and two containers sharing
// one namespace.
func TestNetworkModes(t *testing.T) {
	prerequisites(t)
	be := startBackend(t, "be")
	be2 := startBackend(t, "be2")
	srvs, hosts := service("web.service.test", be)
	srvs2, hosts2 := service("two.service.test", be2)
	for k, v := range hosts2 {
		hosts[k] = v
	}
	dns := testenv.Dnsmasq(t, append(srvs, srvs2...), hosts)
	startDaemon(t, dns)

	network := testenv.RandomName("cnt-e2e-")
	// Docker adds rules of its own to the host for a bridge network (no
	// other driver works on this kernel); --internal keeps them minimal, the
	// test range keeps addresses off real networks, and prerequisites'
	// guard proves the host's rules are back to what they were afterwards.
	testenv.Run(t, "docker", "network", "create", "--internal", "--subnet", "198.18.101.0/24",
		"--label", "connectable.test=1", network)
	t.Cleanup(func() { _ = exec.Command("docker", "network", "rm", network).Run() })

	userDefined := container(t, "--network", network, "-l", "connect.6000=web.service.test")
	none := container(t, "--network", "none", "-l", "connect.6000=web.service.test")
	owner := container(t, "-l", "connect.6000=web.service.test")
	sharer := container(t, "--network", "container:"+owner, "-l", "connect.6001=two.service.test")

	for _, tc := range []struct{ name, id, url, want string }{
		{"user-defined network", userDefined, "http://localhost:6000/", "be"},
		{"network none", none, "http://localhost:6000/", "be"},
		{"shared namespace, owner's label, from owner", owner, "http://localhost:6000/", "be"},
		{"shared namespace, sharer's label, from owner", owner, "http://localhost:6001/", "be2"},
		{"shared namespace, owner's label, from sharer", sharer, "http://localhost:6000/", "be"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			eventually(t, 20*time.Second, tc.url, func() error {
				got, err := fetch(t, tc.id, tc.url)
				if err == nil && got != tc.want {
					err = fmt.Errorf("got %q, want %q", got, tc.want)
				}
				return err
			})
		})
	}
}

// Case 4: host network mode is skipped with a warning; the host's rules stay
// as they were (prerequisites guards them).
func TestHostModeSkipped(t *testing.T) {
	prerequisites(t)
	be := startBackend(t, "be")
	srvs, hosts := service("web.service.test", be)
	d := startDaemon(t, testenv.Dnsmasq(t, srvs, hosts))
	id := container(t, "--network", "host", "-l", "connect.6000=web.service.test")
	if !d.waitLog("skipping container in host network mode", 20*time.Second) {
		t.Fatalf("no warning about the host-mode container in the logs")
	}
	for _, line := range strings.Split(d.logs.String(), "\n") {
		if strings.Contains(line, "host network mode") && !strings.Contains(line, id[:12]) {
			t.Errorf("the warning does not name the container %.12s: %s", id, line)
		}
	}
	// Give a wrongly accepted container time to be set up, then check the
	// host's loopback has no listener on the labelled port: set-up would
	// have redirected the host's own localhost:6000.
	time.Sleep(time.Second)
	if c, err := net.DialTimeout("tcp", "127.0.0.1:6000", time.Second); err == nil {
		c.Close()
		t.Errorf("127.0.0.1:6000 on the host accepts connections")
	}
}

// Case 5: a container started before connectable is set up when it starts;
// the time to first connection is logged for the note.
func TestContainerStartedBeforeDaemon(t *testing.T) {
	prerequisites(t)
	_, dns := webService(t)
	id := container(t, "-l", "connect.6000=web.service.test")
	start := time.Now()
	startDaemon(t, dns)
	eventually(t, 20*time.Second, "request through a container older than the daemon", func() error {
		_, err := fetch(t, id, "http://localhost:6000/")
		return err
	})
	t.Logf("first request served %v after the daemon started", time.Since(start).Round(time.Millisecond))
}

// Case 6: connectable restarted while containers run, gracefully and by
// SIGKILL: the rules stay for the next start, connections work again
// promptly, each rule exists once.
func TestDaemonRestart(t *testing.T) {
	prerequisites(t)
	_, dns := webService(t)
	id := container(t, "-l", "connect.6000=web.service.test", "-l", "connect.6001=web.service.test")
	d := startDaemon(t, dns)
	eventually(t, 20*time.Second, "first request", func() error {
		_, err := fetch(t, id, "http://localhost:6000/")
		return err
	})
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
		t.Run(sig.String(), func(t *testing.T) {
			before := ruleLines(rulesIn(t, id, "iptables", "nft"))
			code := d.stop(sig)
			if sig == syscall.SIGTERM && code != 0 {
				t.Errorf("exit code after SIGTERM = %d, want 0", code)
			}
			if after := ruleLines(rulesIn(t, id, "iptables", "nft")); after != before {
				t.Errorf("after %v the rules changed; want them kept for the next start:\nbefore:\n%s\nafter:\n%s", sig, before, after)
			}
			start := time.Now()
			d = startDaemon(t, dns)
			eventually(t, 20*time.Second, "request after restart", func() error {
				_, err := fetch(t, id, "http://localhost:6000/")
				return err
			})
			t.Logf("after %v: connections work again %v after the new start", sig, time.Since(start).Round(time.Millisecond))
			rulesOnce(t, id, "6000", "6001")
		})
	}
}

// Case 7: a container stopped and removed leaves no listener or state.
func TestContainerRemovedLeavesNothing(t *testing.T) {
	prerequisites(t)
	be := startBackend(t, "be")
	srvs, hosts := service("web.service.test", be)
	d := startDaemon(t, testenv.Dnsmasq(t, srvs, hosts))
	id := container(t, "-l", "connect.6000=web.service.test")
	eventually(t, 20*time.Second, "first request", func() error {
		_, err := fetch(t, id, "http://localhost:6000/")
		return err
	})
	inodes := listenerInodes(t, id)
	if len(inodes) == 0 {
		t.Fatalf("no listener found in the container's namespace:\n%s", listenersIn(t, id))
	}
	testenv.Run(t, "docker", "rm", "-f", id)
	eventually(t, 20*time.Second, "the daemon closes the container's listeners", func() error {
		held := socketInodes(t, d.cmd.Process.Pid)
		for _, ino := range inodes {
			if held[ino] {
				return fmt.Errorf("daemon still holds listener socket %s", ino)
			}
		}
		return nil
	})
}

// Case 8: a killed backend costs the clients nothing: new connections go to
// the others.
func TestBackendFailover(t *testing.T) {
	prerequisites(t)
	a, b, c := startBackend(t, "a"), startBackend(t, "b"), startBackend(t, "c")
	srvs, hosts := service("web.service.test", a, b, c)
	startDaemon(t, testenv.Dnsmasq(t, srvs, hosts))
	id := container(t, "-l", "connect.6000=web.service.test")
	eventually(t, 20*time.Second, "first request", func() error {
		_, err := fetch(t, id, "http://localhost:6000/")
		return err
	})
	b.stop()
	bodies := fetchMany(t, id, "http://localhost:6000/", 30)
	seen := map[string]int{}
	for _, body := range bodies {
		seen[body]++
	}
	if seen["FAIL"] > 0 || seen["b"] > 0 || seen["a"]+seen["c"] != 30 {
		t.Fatalf("after backend b died: %v; want all 30 served by a and c", seen)
	}
}

// Case 9: bad labels are logged and skipped; the valid ones still work.
func TestBadLabels(t *testing.T) {
	prerequisites(t)
	be := startBackend(t, "be")
	srvs, hosts := service("web.service.test", be)
	d := startDaemon(t, testenv.Dnsmasq(t, srvs, hosts))
	id := container(t,
		"-l", "connect.abc=web.service.test",
		"-l", "connect.70000=web.service.test",
		"-l", "connect.6001=",
		"-l", "connect.6002=not a name",
		"-l", "connect.6000=web.service.test")
	eventually(t, 20*time.Second, "request through the valid label", func() error {
		_, err := fetch(t, id, "http://localhost:6000/")
		return err
	})
	logs := d.logs.String()
	for _, label := range []string{"connect.abc", "connect.70000", "connect.6001", "connect.6002"} {
		if !strings.Contains(logs, label) {
			t.Errorf("no log line names the bad label %s", label)
		}
	}
}

var inoRE = regexp.MustCompile(`ino:(\d+)`)

// listenerInodes returns the socket inodes of the listeners inside the
// container's namespace.
func listenerInodes(t *testing.T, id string) []string {
	t.Helper()
	out := testenv.Exec(t, fmt.Sprintf("/proc/%d/ns/net", pid(t, id)), "ss", "-ltnHe")
	var inodes []string
	for _, m := range inoRE.FindAllStringSubmatch(out, -1) {
		inodes = append(inodes, m[1])
	}
	return inodes
}

// socketInodes returns the inodes of the sockets a process holds.
func socketInodes(t *testing.T, pid int) map[string]bool {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatalf("listing descriptors: %v", err)
	}
	held := map[string]bool{}
	for _, e := range ents {
		link, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err == nil && strings.HasPrefix(link, "socket:[") {
			held[strings.TrimSuffix(strings.TrimPrefix(link, "socket:["), "]")] = true
		}
	}
	return held
}

// ruleLines keeps the rules of an iptables-save listing: not its
// comments, which carry the time, nor its counters.
func ruleLines(save string) string {
	var out []string
	for _, l := range strings.Split(save, "\n") {
		if strings.HasPrefix(l, "-A ") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// rulesOnce checks, for IPv4 and IPv6, that the container's namespace
// holds exactly one REDIRECT rule per port and one jump from OUTPUT: a
// restarted daemon rebuilds its chain instead of adding to it.
func rulesOnce(t *testing.T, id string, ports ...string) {
	t.Helper()
	for _, family := range []string{"iptables", "ip6tables"} {
		rules := rulesIn(t, id, family, "nft")
		for _, port := range ports {
			if n := strings.Count(rules, "--dport "+port+" "); n != 1 {
				t.Errorf("%s rule for port %s appears %d times, want 1:\n%s", family, port, n, rules)
			}
		}
		if n := strings.Count(rules, "-A OUTPUT"); n != 1 {
			t.Errorf("%s: %d jumps from OUTPUT, want 1:\n%s", family, n, rules)
		}
	}
}
