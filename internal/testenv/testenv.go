// Package testenv owns the prerequisites of connectable's tests: root, network
// namespaces, iptables, Docker and helper binaries such as dnsmasq.
//
// A test that lacks one skips with a reason on a developer's machine. When the
// environment variable CONNECTABLE_TEST_STRICT is set to 1 (as .ci/run does),
// the same lack fails the test instead, so CI can never go green by skipping.
//
// Typical usage:
//
//	func TestRedirect(t *testing.T) {
//		testenv.NeedRoot(t)
//		ns := testenv.NewNetNS(t) // removed when the test ends
//		out := testenv.Exec(t, ns, "ip", "addr")
//	}
package testenv

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"strings"
	"testing"
	"time"
)

// StrictEnv names the environment variable that turns skips into failures.
const StrictEnv = "CONNECTABLE_TEST_STRICT"

// Strict reports whether missing prerequisites must fail tests.
func Strict() bool { return os.Getenv(StrictEnv) == "1" }

// Skipf skips the test with the reason, or fails it in strict mode.
func Skipf(t testing.TB, format string, args ...any) {
	t.Helper()
	reason := fmt.Sprintf(format, args...)
	if Strict() {
		t.Fatalf("prerequisite missing (%s=1 forbids skipping): %s", StrictEnv, reason)
	}
	t.Skipf("SKIP (set %s=1 to make this fatal): %s", StrictEnv, reason)
}

// NeedRoot skips unless the test runs as root.
func NeedRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Skipf(t, "needs root (network namespaces, iptables)")
	}
}

// NeedCommand skips unless every named program is on PATH.
func NeedCommand(t testing.TB, names ...string) {
	t.Helper()
	for _, n := range names {
		if _, err := exec.LookPath(n); err != nil {
			Skipf(t, "needs %s on PATH (apt-get install it; .ci/run does)", n)
		}
	}
}

// NeedDocker skips unless a Docker Engine answers on the local socket (or
// DOCKER_HOST).
func NeedDocker(t testing.TB) {
	t.Helper()
	NeedCommand(t, "docker")
	out, err := exec.Command("docker", "version", "--format", "{{.Server.Version}}").CombinedOutput()
	if err != nil {
		Skipf(t, "needs a running Docker Engine: docker version: %v: %s", err, bytes.TrimSpace(out))
	}
}

// Run runs a command on the host and returns its combined output, failing the
// test if it fails.
func Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// Exec runs a command inside the network namespace at path (through
// nsenter) and returns its combined output, failing the test if it fails.
func Exec(t testing.TB, netns string, name string, args ...string) string {
	t.Helper()
	return Run(t, "nsenter", append([]string{"--net=" + netns, "--", name}, args...)...)
}

// RandomName returns prefix followed by 8 random hex digits, for namespaces,
// containers and networks that tests create.
func RandomName(prefix string) string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

// NewNetNS creates a fresh named network namespace with its loopback up
// (IPv4 and IPv6) and returns its path. It is deleted when the test ends.
func NewNetNS(t testing.TB) string {
	t.Helper()
	NeedRoot(t)
	NeedCommand(t, "ip", "nsenter")
	name := RandomName("cnt-test-")
	Run(t, "ip", "netns", "add", name)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", name, err, out)
		}
	})
	path := "/var/run/netns/" + name
	Exec(t, path, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=0")
	Exec(t, path, "ip", "link", "set", "lo", "up")
	waitIPv6Loopback(t, path)
	return path
}

// waitIPv6Loopback waits for ::1 to be usable: the address goes through
// duplicate address detection right after the link comes up.
func waitIPv6Loopback(t testing.TB, path string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		out, _ := exec.Command("nsenter", "--net="+path, "--", "ip", "-6", "addr", "show", "dev", "lo").CombinedOutput()
		if bytes.Contains(out, []byte("::1/128")) && !bytes.Contains(out, []byte("tentative")) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("::1 never became usable in %s:\n%s", path, out)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

var counters = regexp.MustCompile(`\[\d+:\d+\]`)

// RootRules returns the rules of the machine's own network namespace, for
// every iptables backend and both families, without comments or counters, so
// two snapshots compare equal when nothing changed.
func RootRules() (string, error) {
	var b strings.Builder
	for _, cmd := range []string{"iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save", "ip6tables-legacy-save"} {
		if _, err := exec.LookPath(cmd); err != nil {
			continue
		}
		out, err := exec.Command(cmd).Output()
		if err != nil {
			return "", fmt.Errorf("%s: %w", cmd, err)
		}
		fmt.Fprintf(&b, "== %s\n", cmd)
		for _, line := range strings.Split(string(out), "\n") {
			if strings.HasPrefix(line, "#") || line == "" {
				continue
			}
			b.WriteString(counters.ReplaceAllString(line, "[]"))
			b.WriteByte('\n')
		}
	}
	return b.String(), nil
}

// GuardRootRules fails the test if the root namespace's rules differ when
// it ends from what they were when it started. Use it in tests that touch
// iptables, to prove they acted only inside their own namespaces.
func GuardRootRules(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		return
	}
	before, err := RootRules()
	if err != nil {
		t.Fatalf("snapshot of root namespace rules: %v", err)
	}
	t.Cleanup(func() {
		after, err := RootRules()
		if err != nil {
			t.Errorf("snapshot of root namespace rules: %v", err)
			return
		}
		if before != after {
			t.Errorf("root namespace rules changed during the test:\nbefore:\n%s\nafter:\n%s", before, after)
		}
	})
}

// CheckGoroutines fails the test if, when it ends, more goroutines run than
// when it started (after a grace period for goroutines on their way out).
// Register it before anything whose goroutines must be gone by then, since
// cleanups run last-in first-out.
func CheckGoroutines(t testing.TB) {
	t.Helper()
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		if n := runtime.NumGoroutine(); n > before {
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			t.Errorf("goroutines leaked: %d before, %d after:\n%s", before, n, buf)
		}
	})
}

// OpenFDs returns how many file descriptors this process holds.
func OpenFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatalf("counting descriptors: %v", err)
	}
	return len(ents)
}
