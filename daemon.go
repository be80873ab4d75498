package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/connectable/connectable/admin"
	"github.com/connectable/connectable/docker"
	"github.com/connectable/connectable/iptables"
	"github.com/connectable/connectable/policy"
	"github.com/connectable/connectable/proxy"
	"github.com/connectable/connectable/reconcile"
	"github.com/connectable/connectable/resolver"
)

var (
	_ proxy.Resolver   = (*resolver.Resolver)(nil)
	_ proxy.Redirector = (*iptables.NAT)(nil)
	_ reconcile.Path   = (*proxy.Server)(nil)
	_ docker.Sink      = (*reconcile.Reconciler)(nil)
)

// daemon runs connectable until ctx ends, then lets the relay's live
// connections drain (serving new ones until the old ones are done). Both
// paths stay for the next start: the relay's rules, which it listens
// behind again, and the socket path in the kernel, serving, which it
// adopts (`connectable cleanup` removes them). procs, the Go scheduler's
// GOMAXPROCS, is only reported.
func daemon(ctx context.Context, c *config, procs int, logw io.Writer) error {
	log := newLogger(c, logw)
	if err := preflight(); err != nil {
		return err
	}
	res, err := newResolver(c, log)
	if err != nil {
		return err
	}
	nat, err := iptables.New(iptables.Config{Backend: c.iptables, Logger: log})
	if err != nil {
		return fmt.Errorf("setting up iptables: %w", err)
	}
	client, err := docker.NewClient(c.dockerHost)
	if err != nil {
		return fmt.Errorf("connecting to Docker: %w", err)
	}
	nofile := raiseFileLimit(log)
	perNS, maxConns := connCaps(c, nofile)
	// One target policy bounds both paths.
	pol := policy.New(c.allowTargets, c.denyTargets)
	srv := &proxy.Server{
		Resolver:             res,
		Policy:               pol,
		MaxConnsPerNamespace: perNS,
		MaxConns:             maxConns,
		MaxDialsPerNamespace: c.maxDialsPerNS,
		Redirector:           nat,
		Port:                 c.port,
		ConnectTimeout:       c.connectTimeout,
		DialTimeout:          c.dialTimeout,
		ConnectStagger:       c.connectStagger,
		BackendTimeout:       c.backendTimeout,
		DrainTimeout:         c.drainTimeout,
		KeepRules:            true,
		HalfCloseTimeout:     c.halfClose,
		Logger:               log,
	}
	ports := docker.NewPortTable(client, log)
	sock, err := startSocketPath(c, log, res, pol.Check, ports)
	if err != nil {
		return err
	}
	if sock != nil {
		// One endpoint-health model: the relay's dials are the daemon's
		// own evidence for the socket path too, and its dial order heeds
		// what the socket path's probes confirmed.
		srv.Health = sock.Tracker()
	}
	rec := reconcile.New(reconcile.Config{Paths: pathsOf(srv, sock), Logger: log})
	listed := make(chan struct{})
	var listedOnce sync.Once
	w := docker.NewWatcher(docker.Config{
		Listed: func() {
			rec.Full()
			listedOnce.Do(func() { close(listed) })
		},
		Client:         client,
		Sink:           rec,
		Ports:          ports,
		Validate:       func(v string) error { return validateLabel(c, v) },
		ResyncInterval: c.resync,
		SelfID:         docker.SelfContainerID(),
		Logger:         log,
	})
	hooks := startHookServer(c, log, w, rec, ports, sock)
	acfg := admin.Config{Version: version, Proxy: srv, Resolver: res, Watcher: w, Reconciler: rec, Logger: log}
	if sock != nil {
		acfg.Socket = sock
	}
	adm := admin.New(acfg)
	portMode := "ephemeral"
	if c.port != 0 {
		portMode = fmt.Sprint(c.port)
	}
	log.Info("connectable starting", "version", version, "docker", client.Endpoint(),
		"dns", res.Servers(), "iptables", nat.Backend(), "port", portMode, "admin", c.admin, "procs", procs,
		"file_limit", nofile, "max_conns", maxConns, "max_conns_per_namespace", perNS, "datapath", c.datapath)

	start := time.Now()
	ctx, cancel := context.WithCancel(ctx)
	adminDone := make(chan error, 1)
	if c.admin != "" {
		ln, err := net.Listen("tcp", c.admin)
		if err != nil {
			cancel()
			hooks.Close()
			if sock != nil {
				sock.stop() // what a previous run left keeps serving
			}
			return fmt.Errorf("admin endpoint on %s: %w", c.admin, err)
		}
		go func() { adminDone <- adm.ServeListener(ctx, ln) }()
	} else {
		adminDone <- nil
	}
	sweepDone := make(chan struct{})
	go func() {
		defer close(sweepDone)
		if sock != nil {
			sweepWhenSettled(ctx, sock.Sweep, listed, rec, firstSweepDeadline, log)
		}
	}()
	runErr := w.Run(ctx)
	cancel()
	hooks.Close()
	<-sweepDone
	// Set-ups in flight are cancelled first, so that the relay's drain
	// sees every namespace that was set up. The relay drains before the
	// socket path's workers stop: its dials still feed the shared
	// endpoint health. The socket path stays in the kernel and keeps
	// serving its ports while no daemon runs; the next start adopts it.
	rec.Close()
	closeErr := srv.Close()
	if sock != nil {
		closeErr = errors.Join(closeErr, sock.stop())
		log.Info("the socket path keeps serving until the next start (connectable cleanup removes it)", "pins", c.bpfDir)
	}
	if err := <-adminDone; err != nil {
		log.Warn("admin endpoint stopped", "err", err)
	}
	log.Info("connectable stopped", "uptime", time.Since(start).Round(time.Second))
	if runErr != nil {
		return runErr
	}
	return closeErr
}

// validateLabel checks a label value against --label-allow, then as the
// resolver would parse it.
func validateLabel(c *config, v string) error {
	if err := labelAllowed(c.labelAllow, v); err != nil {
		return err
	}
	return resolver.Validate(v)
}

func newResolver(c *config, log *slog.Logger) (*resolver.Resolver, error) {
	r, err := resolver.New(resolver.Config{
		Servers:     c.dns,
		Timeout:     c.dnsTimeout,
		MinTTL:      c.dnsMinTTL,
		MaxTTL:      c.dnsMaxTTL,
		NegativeTTL: c.dnsNegTTL,
		StaleFor:    c.dnsStale,
		CacheSize:   c.dnsCacheSize,
		Logger:      log,
	})
	if err != nil {
		return nil, fmt.Errorf("setting up the resolver: %w", err)
	}
	return r, nil
}
