package e2e

import (
	"bytes"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
)

// consulBinary is where `make consul` puts the pinned Consul build, outside
// the repository so it survives between runs; CONNECTABLE_CONSUL overrides.
const consulBinary = "/var/cache/connectable/consul-1.22.7"

// consulAgent is a real Consul agent in dev mode, every port on loopback.
type consulAgent struct {
	http, dns string
}

func startConsul(t *testing.T) *consulAgent {
	t.Helper()
	bin := os.Getenv("CONNECTABLE_CONSUL")
	if bin == "" {
		bin = consulBinary
	}
	if _, err := os.Stat(bin); err != nil {
		testenv.Skipf(t, "needs a Consul binary at %s (make consul builds it): %v", bin, err)
	}
	ports := make([]int, 6)
	for i := range ports {
		ports[i] = freePort(t)
	}
	hcl := fmt.Sprintf(`ports { http = %d, dns = %d, server = %d, serf_lan = %d, serf_wan = %d, grpc = %d }`,
		ports[0], ports[1], ports[2], ports[3], ports[4], ports[5])
	dir := t.TempDir()
	cmd := exec.Command(bin, "agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1",
		"-node", "e2e", "-data-dir", dir, "-hcl", hcl, "-log-level", "warn")
	var logs testenv.SyncBuffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting consul: %v", err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-done
		if t.Failed() {
			t.Logf("consul logs:\n%s", logs.String())
		}
	})
	a := &consulAgent{
		http: "http://127.0.0.1:" + strconv.Itoa(ports[0]),
		dns:  "127.0.0.1:" + strconv.Itoa(ports[1]),
	}
	eventually(t, 60*time.Second, "consul has a leader", func() error {
		resp, err := http.Get(a.http + "/v1/status/leader")
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		var b bytes.Buffer
		b.ReadFrom(resp.Body)
		if !strings.Contains(b.String(), ":") {
			return fmt.Errorf("no leader yet: %s", b.String())
		}
		return nil
	})
	return a
}

func (a *consulAgent) put(t *testing.T, path, body string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPut, a.http+path, strings.NewReader(body))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("PUT %s: %v", path, err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("PUT %s: %s", path, resp.Status)
	}
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// Case 11: a real Consul agent; three registered instances serve traffic, a
// failing TTL check takes one out of every new connection, passing it brings
// it back.
func TestConsul(t *testing.T) {
	prerequisites(t)
	consul := startConsul(t)
	backends := []*backend{startBackend(t, "a"), startBackend(t, "b"), startBackend(t, "c")}
	for _, b := range backends {
		consul.put(t, "/v1/agent/service/register", fmt.Sprintf(
			`{"ID":"web-%s","Name":"web","Address":"127.0.0.1","Port":%d,"Check":{"TTL":"10m","Status":"passing"}}`,
			b.name, b.port()))
	}
	startDaemon(t, consul.dns)
	id := container(t, "-l", "connect.6000=web.service.consul")

	share := func(n int) map[string]int {
		seen := map[string]int{}
		for _, body := range fetchMany(t, id, "http://localhost:6000/", n) {
			seen[body]++
		}
		return seen
	}
	eventually(t, 30*time.Second, "all three instances serve", func() error {
		if seen := share(30); seen["a"] == 0 || seen["b"] == 0 || seen["c"] == 0 || seen["FAIL"] > 0 {
			return fmt.Errorf("shares %v", seen)
		}
		return nil
	})

	consul.put(t, "/v1/agent/check/fail/service:web-b", "")
	eventually(t, 30*time.Second, "failing instance b leaves the rotation", func() error {
		if seen := share(30); seen["b"] > 0 || seen["FAIL"] > 0 || seen["a"] == 0 || seen["c"] == 0 {
			return fmt.Errorf("shares %v", seen)
		}
		return nil
	})

	consul.put(t, "/v1/agent/check/pass/service:web-b", "")
	eventually(t, 30*time.Second, "instance b is back", func() error {
		if seen := share(30); seen["b"] == 0 || seen["FAIL"] > 0 {
			return fmt.Errorf("shares %v", seen)
		}
		return nil
	})
}
