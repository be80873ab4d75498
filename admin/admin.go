// Package admin owns connectable's admin endpoint: Prometheus metrics, the
// live state as JSON, and a health check. Everything it serves is read-only:
// no request changes the daemon's state, so exposing it (on loopback by
// default) cannot be used to redirect traffic.
//
// It reads snapshots from the proxy, the resolver and the Docker watcher when
// a request arrives; nothing is counted on the connection path for it.
//
// Typical usage:
//
//	a := admin.New(version, logger)
//	a.Proxy, a.Resolver = srv, res
//	a.Watcher = docker.NewWatcher(docker.Config{Sink: a.TimeSetup(srv), ...})
//	go a.Serve(ctx, "127.0.0.1:9876")
package admin

import (
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

	"github.com/connectable/connectable/docker"
	"github.com/connectable/connectable/proxy"
	"github.com/connectable/connectable/resolver"
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
	Namespaces() []docker.Namespace
}

// Sink is the Docker watcher's view of the proxy, which TimeSetup wraps.
type Sink interface {
	Apply(ctx context.Context, key, netns string, routes map[uint16]string) error
	Remove(ctx context.Context, key string) error
}

// Admin serves the admin endpoint. Set its sources before serving; a nil
// source leaves its part out.
type Admin struct {
	Proxy    Proxy
	Resolver Resolver
	Watcher  Watcher

	version string
	log     *slog.Logger

	registry *prometheus.Registry
	setup    prometheus.Histogram
	mux      *http.ServeMux
}

// New returns an Admin for the given version, with no sources yet.
func New(version string, log *slog.Logger) *Admin {
	if log == nil {
		log = slog.Default()
	}
	a := &Admin{version: version, log: log.With("component", "admin")}
	a.setup = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "connectable_setup_seconds",
		Help: "Time to set up or update one network namespace (listeners, iptables rules, routes).",
		// From the few milliseconds a namespace takes to the Docker
		// timeouts a stuck one hits.
		Buckets: []float64{.002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10},
	})
	a.registry = prometheus.NewRegistry()
	a.registry.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		a.setup,
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

// Serve listens on addr and serves the endpoint until ctx ends.
func (a *Admin) Serve(ctx context.Context, addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("admin endpoint: %w", err)
	}
	return a.ServeListener(ctx, ln)
}

// ServeListener serves the endpoint on ln until ctx ends, then closes it.
func (a *Admin) ServeListener(ctx context.Context, ln net.Listener) error {
	srv := &http.Server{Handler: a.mux, ReadHeaderTimeout: 10 * time.Second}
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

// TimeSetup wraps the Docker watcher's sink so every Apply is timed into the
// connectable_setup_seconds histogram.
func (a *Admin) TimeSetup(next Sink) Sink { return &timedSink{next: next, h: a.setup} }

type timedSink struct {
	next Sink
	h    prometheus.Histogram
}

func (t *timedSink) Apply(ctx context.Context, key, netns string, routes map[uint16]string) error {
	start := time.Now()
	err := t.next.Apply(ctx, key, netns, routes)
	t.h.Observe(time.Since(start).Seconds())
	return err
}

func (t *timedSink) Remove(ctx context.Context, key string) error { return t.next.Remove(ctx, key) }

func (a *Admin) serveHealth(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	if a.Watcher == nil || !a.Watcher.Healthy() {
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
