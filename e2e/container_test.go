package e2e

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
)

// Case 10: connectable itself runs as a container, from an image built
// locally from the static binary plus iptables, with only the Docker socket,
// --pid=host and the two capabilities it needs (NET_ADMIN for iptables,
// SYS_ADMIN for setns). --privileged grants a superset, but this machine's
// engine cannot grant it at all (its own bounding set lacks
// CAP_SYS_RESOURCE, so runc fails with "unable to apply caps"). It shares the host's network namespace so
// that it reaches the loopback backends and DNS server of this test; it
// carries a connect label itself, which it must ignore.
//
// It runs the relay whatever CONNECTABLE_E2E_DATAPATH says: the socket path as
// a container needs the host's bpffs and cgroup namespace mounted in
// (README "Data paths"), another set of flags than this test's subject.
func TestDaemonAsContainer(t *testing.T) {
	prerequisites(t)
	tag := daemonImage(t)

	_, dns := webService(t)

	daemon := testenv.RunContainer(t, "--cap-add", "NET_ADMIN", "--cap-add", "SYS_ADMIN", "--pid=host", "--network=host",
		"-v", "/var/run/docker.sock:/var/run/docker.sock",
		"-l", "connect.6000=web.service.test",
		tag, "--datapath", "relay", "--dns", dns, "--log-level", "debug", "--resync", "2s", "--allow-targets", "127.0.0.0/8") // a loopback backend
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := exec.Command("docker", "logs", daemon).CombinedOutput()
			t.Logf("daemon container logs:\n%s", out)
		}
	})

	id := container(t, "-l", "connect.6000=web.service.test")
	eventually(t, 30*time.Second, "request through the containerised daemon", func() error {
		_, err := fetch(t, id, "http://localhost:6000/")
		return err
	})

	// A graceful stop leaves the rules for the next start; cleanup, run
	// from the image as the README says, removes them.
	testenv.Run(t, "docker", "stop", "-t", "20", daemon)
	if code := strings.TrimSpace(testenv.Run(t, "docker", "inspect", "-f", "{{.State.ExitCode}}", daemon)); code != "0" {
		t.Errorf("daemon container exit code %s, want 0", code)
	}
	for _, family := range []string{"iptables", "ip6tables"} {
		if rules := rulesIn(t, id, family, "nft"); !strings.Contains(rules, "CONNECTABLE") {
			t.Errorf("%s rules gone after the daemon container stopped; want them kept for the next start:\n%s", family, rules)
		}
	}
	out := testenv.Run(t, "docker", "run", "--rm", "-l", testenv.TestLabel, "--cap-add", "NET_ADMIN", "--cap-add", "SYS_ADMIN",
		"--pid=host", "--network=host", "-v", "/var/run/docker.sock:/var/run/docker.sock",
		tag, "cleanup", "--bpf-dir", "/nonexistent/connectable", "--admin=")
	t.Logf("cleanup: %s", strings.TrimSpace(out))
	for _, family := range []string{"iptables", "ip6tables"} {
		if rules := rulesIn(t, id, family, "nft"); strings.Contains(rules, "CONNECTABLE") {
			t.Errorf("%s rules left after cleanup:\n%s", family, rules)
		}
	}
}

// daemonImage builds an image of the binary under test with
// scripts/local-image.sh (no registry needed) and removes it when the test
// ends.
func daemonImage(t *testing.T) string {
	t.Helper()
	tag := "connectable-test/daemon:" + testenv.RandomName("")
	script, _ := filepath.Abs("../scripts/local-image.sh")
	testenv.Run(t, script, tag, binary)
	t.Cleanup(func() { _ = exec.Command("docker", "rmi", "-f", tag).Run() })
	return tag
}
