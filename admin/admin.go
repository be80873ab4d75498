// Package admin owns connectable's admin endpoint: Prometheus metrics, the
// live state as JSON, and a health check. Everything it serves is read-only:
// no request changes the daemon's state, so exposing it (on loopback by
// default) cannot be used to redirect traffic.
//
// It reads snapshots from the proxy, the resolver, the Docker watcher and the
// reconciler when a request arrives, through interfaces it declares; nothing
// is counted on the connection path for it, and no request waits for a
// namespace's set-up.
//
// Typical usage, once the sources exist:
//
//	a := admin.New(admin.Config{Version: version, Proxy: srv, Resolver: res, Watcher: w, Reconciler: rec})
//	go a.ServeListener(ctx, ln)
package admin

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/net/netutil"

	"github.com/connectable/connectable/docker"
	"github.com/connectable/connectable/proxy"
	"github.com/connectable/connectable/reconcile"
	"github.com/connectable/connectable/resolver"
	"github.com/connectable/connectable/sockpath"
)

// Proxy is what the admin endpoint reads from the proxy.
type Proxy interface {
	Stats() proxy.Stats
	Namespaces() []proxy.NamespaceStatus
}

// Resolver is what the admin endpoint reads from the resolver.
type Resolver interface {
	Stats() resolver.Stats
}

// Watcher is what the admin endpoint reads from the Docker watcher.
type Watcher interface {
	Healthy() bool
	Stats() docker.Stats
}

// Reconciler is what the admin endpoint reads from the reconciler: each
// namespace's desired state and how its set-up went.
type Reconciler interface {
	Status() []reconcile.Status
	SetupTimes() reconcile.Histogram
}

// Socket is what the admin endpoint reads from the socket data path: how
// each port is served, endpoint health, and the kernel's counters.
type Socket interface {
	Status() []sockpath.Serving
	Counters() ([]sockpath.ServiceCounter, error)
	// Health lists the endpoints under suspicion, confirmed dead, or
	// reached by a probe lately.
	Health() []sockpath.EndpointHealth
	// KernelStats is what the kernel and the daemon dropped or ignored.
	KernelStats() (sockpath.KernelStats, error)
}

// Config names the endpoint's sources. A nil source leaves its part out.
type Config struct {
	Version    string
	Proxy      Proxy
	Resolver   Resolver
	Watcher    Watcher
	Reconciler Reconciler
	Socket     Socket // nil when --datapath is relay, or auto found no socket path
	// Logger optionally receives the endpoint's logs; if nil, slog.Default().
	Logger *slog.Logger
	// MaxConns optionally caps the connections served at once (more wait
	// in the listen queue); if 0, DefaultMaxConns.
	MaxConns int
	// Timeout optionally bounds reading one request and writing its
	// answer, and (four times over) an idle keep-alive connection; if 0,
	// DefaultTimeout.
	Timeout time.Duration
}

// Defaults for Config's zero values. A scrape takes milliseconds; the bounds
// are there so that clients that connect and stall cannot pile up.
const (
	DefaultMaxConns = 64
	DefaultTimeout  = 10 * time.Second
)

// Admin serves the admin endpoint. Create it with New.
type Admin struct {
	cfg      Config
	log      *slog.Logger
	registry *prometheus.Registry
	mux      *http.ServeMux
}

// New returns an Admin reading from the sources in cfg.
func New(cfg Config) *Admin {
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	a := &Admin{cfg: cfg, log: log.With("component", "admin")}
	a.registry = prometheus.NewRegistry()
	a.registry.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		&collector{a: a},
	)
	a.mux = http.NewServeMux()
	a.mux.Handle("GET /metrics", promhttp.HandlerFor(a.registry, promhttp.HandlerOpts{}))
	a.mux.HandleFunc("GET /status", a.serveStatus)
	a.mux.HandleFunc("GET /healthz", a.serveHealth)
	return a
}

// Handler returns the endpoint's HTTP handler. Only GET is served.
func (a *Admin) Handler() http.Handler { return a.mux }

// ServeListener serves the endpoint on ln until ctx ends, then closes it.
func (a *Admin) ServeListener(ctx context.Context, ln net.Listener) error {
	timeout := cmp.Or(a.cfg.Timeout, DefaultTimeout)
	ln = netutil.LimitListener(ln, cmp.Or(a.cfg.MaxConns, DefaultMaxConns))
	srv := &http.Server{
		Handler:           a.mux,
		ReadHeaderTimeout: timeout,
		ReadTimeout:       timeout,
		WriteTimeout:      timeout,
		IdleTimeout:       4 * timeout,
		ErrorLog:          slog.NewLogLogger(a.log.Handler(), slog.LevelDebug),
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		<-ctx.Done()
		shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(shutdownCtx)
	}()
	err := srv.Serve(ln)
	<-done
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

func (a *Admin) serveHealth(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	if a.cfg.Watcher == nil || !a.cfg.Watcher.Healthy() {
		w.WriteHeader(http.StatusServiceUnavailable)
		fmt.Fprintln(w, "unhealthy: the Docker event stream is down or the last resync failed")
		return
	}
	fmt.Fprintln(w, "ok")
}

func (a *Admin) serveStatus(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(a.Status()); err != nil {
		a.log.Debug("writing status", "err", err)
	}
}
