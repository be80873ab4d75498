package admin

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/connectable/connectable/docker"
	"github.com/connectable/connectable/health"
	"github.com/connectable/connectable/proxy"
	"github.com/connectable/connectable/reconcile"
	"github.com/connectable/connectable/resolver"
	"github.com/connectable/connectable/sockpath"
)

// The sources are snapshots; these fakes return fixed ones. The real
// daemon behind this endpoint is tested end to end in e2e/admin_test.go.
type fakeProxy struct{}

func (fakeProxy) Stats() proxy.Stats {
	return proxy.Stats{
		Services:         map[string]proxy.ServiceStats{"web": {Accepted: 7, Active: 1, Failed: 2, Refused: 4, BytesUp: 10, BytesDown: 20}},
		DialFailures:     map[netip.AddrPort]uint64{netip.MustParseAddrPort("10.0.0.9:80"): 3},
		Failovers:        1,
		LimitedNamespace: 5,
	}
}

func (fakeProxy) Namespaces() []proxy.NamespaceStatus {
	return []proxy.NamespaceStatus{{
		Key: "abc123abc123ffff", NetNS: "/proc/42/ns/net", Port: 40000, Active: 1,
		Routes: []proxy.RouteStatus{{Port: 6000, Service: "web", Endpoints: []proxy.EndpointStatus{
			{Addr: netip.MustParseAddrPort("10.0.0.8:80"), Healthy: true},
			{Addr: netip.MustParseAddrPort("10.0.0.9:80"), Failures: 3},
			{Addr: netip.MustParseAddrPort("127.0.0.1:8500"), Refused: true, LastError: "refused by the target policy"},
		}}},
	}}
}

type fakeResolver struct{}

func (fakeResolver) Stats() resolver.Stats {
	return resolver.Stats{CacheHits: 5, CacheMisses: 2, Queries: 2}
}

type fakeWatcher struct{ healthy bool }

func (w fakeWatcher) Healthy() bool     { return w.healthy }
func (fakeWatcher) Stats() docker.Stats { return docker.Stats{Reconnects: 1, Resyncs: 4} }

type fakeReconciler struct{}

func (fakeReconciler) Status() []reconcile.Status {
	return []reconcile.Status{
		{Namespace: reconcile.Namespace{Key: "abc123abc123ffff", Path: "/proc/42/ns/net",
			Containers: []reconcile.Container{{ID: "abc123abc123", Name: "app"}}, Routes: map[uint16]string{6000: "web"}},
			Applied: true, Setup: 3 * time.Millisecond},
		{Namespace: reconcile.Namespace{Key: "def456def456ffff", Path: "/proc/43/ns/net",
			Containers: []reconcile.Container{{ID: "def456def456", Name: "broken"}}, Routes: map[uint16]string{7000: "db"}},
			Err: "listening in namespace: no such file"},
	}
}

func (fakeReconciler) SetupTimes() reconcile.Histogram {
	return reconcile.Histogram{Bounds: []float64{.01, .1}, Counts: []uint64{2, 3}, Count: 4, Sum: 1.5}
}

func newAdmin(healthy bool) *Admin {
	return New(Config{Version: "v1", Proxy: fakeProxy{}, Resolver: fakeResolver{}, Watcher: fakeWatcher{healthy},
		Reconciler: fakeReconciler{}})
}

func get(t *testing.T, a *Admin, method, path string) (int, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	a.Handler().ServeHTTP(rec, httptest.NewRequest(method, path, nil))
	body, _ := io.ReadAll(rec.Result().Body)
	return rec.Code, string(body)
}

func TestStatusJoinsReconcilerAndProxy(t *testing.T) {
	code, body := get(t, newAdmin(true), http.MethodGet, "/status")
	if code != http.StatusOK {
		t.Fatalf("/status: %d %s", code, body)
	}
	var st Status
	if err := json.Unmarshal([]byte(body), &st); err != nil {
		t.Fatal(err)
	}
	if !st.Healthy || st.Version != "v1" || len(st.Namespaces) != 2 {
		t.Fatalf("status = %+v", st)
	}
	served, broken := st.Namespaces[0], st.Namespaces[1]
	if served.ProxyPort != 40000 || len(served.Containers) != 1 || served.Containers[0].Name != "app" ||
		len(served.Routes) != 1 || len(served.Routes[0].Endpoints) != 3 || served.Routes[0].Endpoints[1].Healthy ||
		!served.Routes[0].Endpoints[2].Refused {
		t.Errorf("served namespace = %+v", served)
	}
	if broken.Error == "" || broken.ProxyPort != 0 || len(broken.Routes) != 1 || broken.Routes[0].Service != "db" {
		t.Errorf("namespace whose set-up failed = %+v; want its error and wanted routes", broken)
	}
}

func TestWriteTable(t *testing.T) {
	var b bytes.Buffer
	if err := WriteTable(&b, newAdmin(false).Status()); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{"UNHEALTHY", "app (abc123abc123)", "6000", "web", "40000 v4",
		"10.0.0.9:80 (backing off, 3 failures)", "127.0.0.1:8500 (refused by the target policy)", "broken (def456def456)", "ERROR: listening in namespace"} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
}

func TestHealthz(t *testing.T) {
	if code, _ := get(t, newAdmin(true), http.MethodGet, "/healthz"); code != http.StatusOK {
		t.Errorf("healthy: %d", code)
	}
	if code, _ := get(t, newAdmin(false), http.MethodGet, "/healthz"); code != http.StatusServiceUnavailable {
		t.Errorf("unhealthy: %d", code)
	}
}

func TestMetrics(t *testing.T) {
	_, page := get(t, newAdmin(true), http.MethodGet, "/metrics")
	for _, want := range []string{
		`connectable_connections_accepted_total{service="web"} 7`,
		`connectable_connections_failed_total{service="web"} 2`,
		`connectable_bytes_total{direction="down",service="web"} 20`,
		`connectable_dial_failures_total{endpoint="10.0.0.9:80"} 3`,
		`connectable_targets_refused_total{service="web"} 4`,
		`connectable_connections_limited_total{scope="namespace"} 5`,
		`connectable_connections_limited_total{scope="global"} 0`,
		`connectable_ports 1`,
		`connectable_dns_lookups_total{result="hit"} 5`,
		`connectable_docker_reconnects_total 1`,
		`connectable_build_info{version="v1"} 1`,
		`connectable_setup_seconds_bucket{le="0.1"} 3`,
		`connectable_setup_seconds_bucket{le="+Inf"} 4`,
		`connectable_setup_seconds_count 4`,
	} {
		if !strings.Contains(page, want+"\n") {
			t.Errorf("/metrics lacks %s", want)
		}
	}
}

func TestReadOnly(t *testing.T) {
	for _, path := range []string{"/status", "/healthz", "/metrics"} {
		for _, method := range []string{http.MethodPost, http.MethodPut, http.MethodDelete} {
			if code, _ := get(t, newAdmin(true), method, path); code != http.StatusMethodNotAllowed {
				t.Errorf("%s %s: %d; want 405", method, path, code)
			}
		}
	}
}

// serve runs a on a loopback listener until the test ends.
func serve(t *testing.T, a *Admin) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.ServeListener(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("ServeListener: %v", err)
		}
	})
	return ln.Addr().String()
}

// TestConnectionCap: clients that connect and send nothing hold at most
// MaxConns of the endpoint's connections; a request beyond them waits until
// one is let go, and the server drops stalled clients after its Timeout.
func TestConnectionCap(t *testing.T) {
	a := New(Config{Version: "v1", Watcher: fakeWatcher{true}, MaxConns: 2, Timeout: 500 * time.Millisecond})
	addr := serve(t, a)
	var stalled []net.Conn
	for range 2 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		stalled = append(stalled, c)
	}
	client := &http.Client{Timeout: 200 * time.Millisecond, Transport: &http.Transport{DisableKeepAlives: true}}
	// The two stalled clients hold both places (once the server took them).
	time.Sleep(50 * time.Millisecond)
	if resp, err := client.Get("http://" + addr + "/healthz"); err == nil {
		resp.Body.Close()
		t.Fatalf("a third client was served while two held the cap of 2")
	}
	// The server's read timeout frees the places: stalled clients see EOF.
	for _, c := range stalled {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil {
			t.Errorf("a stalled client got bytes")
		} else if errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("a stalled client was never dropped")
		}
	}
	client.Timeout = 10 * time.Second
	resp, err := client.Get("http://" + addr + "/healthz")
	if err != nil {
		t.Fatalf("after the stalled clients were dropped: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("/healthz: %s", resp.Status)
	}
}

type fakeSocket struct{}

func (fakeSocket) Status() []sockpath.Serving {
	ep := netip.MustParseAddrPort("198.18.0.5:80")
	return []sockpath.Serving{
		{Key: "abc123abc123ffff", Port: 6000, Family: "ipv4", Service: "web", Path: "socket", Why: "every endpoint is reachable from the namespace", Endpoints: []netip.AddrPort{ep}},
		{Key: "abc123abc123ffff", Port: 6000, Family: "ipv6", Service: "web", Path: "relay", Why: "endpoint 198.18.0.5:80 is IPv6"},
	}
}

func (fakeSocket) Counters() ([]sockpath.ServiceCounter, error) {
	return []sockpath.ServiceCounter{{Service: "web", Endpoint: netip.MustParseAddrPort("198.18.0.5:80"), Connects: 9, Failures: 1}}, nil
}

func (fakeSocket) Health() []sockpath.EndpointHealth {
	return []sockpath.EndpointHealth{{
		Endpoint:   health.Endpoint{Endpoint: netip.MustParseAddrPort("198.18.0.6:80"), State: "suspect", LastError: "connection refused"},
		Namespaces: []string{"abc123abc123ffff"},
	}}
}

func (fakeSocket) KernelStats() (sockpath.KernelStats, error) {
	return sockpath.KernelStats{Evidence: 3, LocalClose: 40, OverBudget: 7, DeadMapFull: 2}, nil
}

func TestSocketPath(t *testing.T) {
	a := New(Config{Version: "v1", Proxy: fakeProxy{}, Reconciler: fakeReconciler{}, Socket: fakeSocket{}})
	st := a.Status()
	if len(st.Health) != 1 || st.Health[0].Endpoint != "198.18.0.6:80" || st.Health[0].State != "suspect" ||
		len(st.Health[0].Namespaces) != 1 || st.Health[0].Namespaces[0] != "abc123abc123ffff" {
		t.Errorf("endpoint health = %+v; want 198.18.0.6:80 suspect by namespace abc123abc123ffff", st.Health)
	}
	paths := st.Namespaces[0].Routes[0].Paths
	if len(paths) != 2 || paths[0].Family != "ipv4" || paths[0].Path != "socket" || len(paths[0].Endpoints) != 1 ||
		paths[1].Path != "relay" || paths[1].Why == "" {
		t.Errorf("paths of port 6000 = %+v; want ipv4 by the socket path, ipv6 by the relay with its reason", paths)
	}
	var b bytes.Buffer
	if err := WriteTable(&b, st); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(b.String(), "ipv4 socket, ipv6 relay") {
		t.Errorf("table lacks the per-family path:\n%s", b.String())
	}
	_, page := get(t, a, http.MethodGet, "/metrics")
	for _, want := range []string{
		`connectable_socket_connects_total{endpoint="198.18.0.5:80",service="web"} 9`,
		`connectable_socket_failures_total{endpoint="198.18.0.5:80",service="web"} 1`,
		`connectable_socket_ports{path="socket"} 1`,
		`connectable_socket_ports{path="relay"} 1`,
		`connectable_socket_evidence_total 3`,
		`connectable_socket_local_aborts_total 40`,
		`connectable_socket_reports_dropped_total{reason="over_budget"} 7`,
		`connectable_socket_map_full_total{map="dead"} 2`,
	} {
		if !strings.Contains(page, want+"\n") {
			t.Errorf("/metrics lacks %s", want)
		}
	}
}
