package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/connectable/connectable/admin"
	"github.com/connectable/connectable/internal/testenv"
)

func get(addr, path string) (int, string, error) {
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + addr + path)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body), err
}

// metric returns the value of one series in a /metrics page, or -1.
func metric(page, series string) float64 {
	re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(series) + ` (\S+)$`)
	m := re.FindStringSubmatch(page)
	if m == nil {
		return -1
	}
	v, _ := strconv.ParseFloat(m[1], 64)
	return v
}

// TestAdminEndpoint drives the admin endpoint of a real daemon: metrics move
// with real connections, /status follows a container from start to removal,
// `connectable status` renders it, and /healthz follows the Docker socket
// being cut and restored (through a relay in front of the real engine).
func TestAdminEndpoint(t *testing.T) {
	prerequisites(t)
	be := startBackend(t, "be")
	srvs, hosts := service("web.service.test", be)
	relay := testenv.NewRelay(t, "/var/run/docker.sock")
	dns := testenv.Dnsmasq(t, srvs, hosts)
	d := startDaemon(t, dns, "--docker-host", "unix://"+relay.Path)

	eventually(t, 20*time.Second, "healthz 200", func() error {
		code, body, err := get(d.admin, "/healthz")
		if err == nil && code != http.StatusOK {
			err = fmt.Errorf("%d %s", code, body)
		}
		return err
	})

	id := container(t, "-l", "connect.6000=web.service.test")
	eventually(t, 20*time.Second, "first request", func() error {
		_, err := fetch(t, id, "http://localhost:6000/")
		return err
	})
	for i := 0; i < 2; i++ {
		if _, err := fetch(t, id, "http://localhost:6000/"); err != nil {
			t.Fatal(err)
		}
	}
	_, page, err := get(d.admin, "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	if v := metric(page, `connectable_connections_accepted_total{service="web.service.test"}`); v < 3 {
		t.Errorf("connections_accepted_total for the service = %v after 3 requests; want ≥ 3", v)
	}
	if v := metric(page, `connectable_bytes_total{direction="down",service="web.service.test"}`); v <= 0 {
		t.Errorf("bytes_total down = %v; want > 0", v)
	}
	for _, series := range []string{"connectable_namespaces", "connectable_ports", "connectable_docker_stream_up"} {
		if v := metric(page, series); v < 1 {
			t.Errorf("%s = %v; want ≥ 1", series, v)
		}
	}
	if v := metric(page, `connectable_setup_seconds_count`); v < 1 {
		t.Errorf("setup_seconds_count = %v; want ≥ 1", v)
	}
	if v := metric(page, `connectable_dns_lookups_total{result="miss"}`); v < 1 {
		t.Errorf("dns_lookups_total miss = %v; want ≥ 1", v)
	}

	// /status names the container, its port, service and the endpoint tried.
	_, body, err := get(d.admin, "/status")
	if err != nil {
		t.Fatal(err)
	}
	var st admin.Status
	if err := json.Unmarshal([]byte(body), &st); err != nil {
		t.Fatalf("/status is not JSON: %v\n%s", err, body)
	}
	ns := findNamespace(st, id)
	if ns == nil {
		t.Fatalf("/status lacks container %.12s:\n%s", id, body)
	}
	if len(ns.Routes) != 1 || ns.Routes[0].Port != 6000 || ns.Routes[0].Service != "web.service.test" ||
		len(ns.Routes[0].Endpoints) != 1 || ns.Routes[0].Endpoints[0].Addr != be.addr.String() || ns.ProxyPort == 0 {
		t.Errorf("/status for the container: %+v; want port 6000 → web.service.test via %s", ns, be.addr)
	}

	// The operator's view of the same, and the first check when a label
	// does not work.
	out, err := exec.Command(binary, "status", "--admin", d.admin).CombinedOutput()
	if err != nil || !strings.Contains(string(out), id[:12]) || !strings.Contains(string(out), "web.service.test") {
		t.Errorf("connectable status: %v\n%s", err, out)
	}
	out, err = exec.Command(binary, "resolve", "web.service.test", "--dns", dns).CombinedOutput()
	if got := strings.TrimSpace(string(out)); err != nil || got != be.addr.String() {
		t.Errorf("connectable resolve: %v, %q; want %s", err, got, be.addr)
	}

	// Docker unreachable: unhealthy, while relayed traffic keeps working.
	relay.Down()
	eventually(t, 20*time.Second, "healthz 503 with the socket cut", func() error {
		if code, _, err := get(d.admin, "/healthz"); err != nil || code != http.StatusServiceUnavailable {
			return fmt.Errorf("code %d, %v", code, err)
		}
		return nil
	})
	if _, err := fetch(t, id, "http://localhost:6000/"); err != nil {
		t.Errorf("a known namespace stopped working while Docker was unreachable: %v", err)
	}
	relay.Up()
	eventually(t, 20*time.Second, "healthz 200 with the socket back", func() error {
		if code, _, err := get(d.admin, "/healthz"); err != nil || code != http.StatusOK {
			return fmt.Errorf("code %d, %v", code, err)
		}
		return nil
	})

	// Removal empties /status.
	testenv.Run(t, "docker", "rm", "-f", id)
	eventually(t, 20*time.Second, "container gone from /status", func() error {
		_, body, err := get(d.admin, "/status")
		if err != nil {
			return err
		}
		var st admin.Status
		if err := json.Unmarshal([]byte(body), &st); err != nil {
			return err
		}
		if findNamespace(st, id) != nil {
			return fmt.Errorf("still listed")
		}
		return nil
	})
}

func findNamespace(st admin.Status, id string) *admin.Namespace {
	for i, ns := range st.Namespaces {
		if strings.HasPrefix(id, ns.Key) || strings.HasPrefix(ns.Key, id[:12]) {
			return &st.Namespaces[i]
		}
	}
	return nil
}
