package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"time"

	"github.com/connectable/connectable/admin"
	"github.com/connectable/connectable/docker"
	"github.com/connectable/connectable/iptables"
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

// daemon runs connectable until ctx ends, then removes its rules from every
// namespace still alive and lets live connections drain. procs, the Go
// scheduler's GOMAXPROCS, is only reported.
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
	srv := &proxy.Server{
		Resolver:             res,
		AllowTargets:         c.allowTargets,
		DenyTargets:          c.denyTargets,
		MaxConnsPerNamespace: perNS,
		MaxConns:             maxConns,
		MaxDialsPerNamespace: c.maxDialsPerNS,
		Redirector:           nat,
		Port:                 c.port,
		ConnectTimeout:       c.connectTimeout,
		DialTimeout:          c.dialTimeout,
		DrainTimeout:         c.drainTimeout,
		HalfCloseTimeout:     c.halfClose,
		Logger:               log,
	}
	ports := docker.NewPortTable(client, log)
	sock, err := startSocketPath(c, log, res, srv.CheckTarget, ports)
	if err != nil {
		return err
	}
	rec := reconcile.New(reconcile.Config{Paths: pathsOf(srv, sock), Logger: log})
	w := docker.NewWatcher(docker.Config{
		Client:         client,
		Sink:           rec,
		Ports:          ports,
		Validate:       func(v string) error { return validateLabel(c, v) },
		ResyncInterval: c.resync,
		SelfID:         docker.SelfContainerID(),
		Logger:         log,
	})
	hooks := startHookServer(c, log, w, rec, ports)
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
				sock.Close() // nothing was set up yet: detach the programs
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
			sweepWhenSettled(ctx, sock, w, rec)
		}
	}()
	runErr := w.Run(ctx)
	cancel()
	hooks.Close()
	<-sweepDone
	// Set-ups in flight are cancelled first, so that the relay's teardown
	// sees every namespace that was set up. The socket path goes before
	// the relay: new connects fall to the relay while it drains.
	rec.Close()
	var sockErr error
	if sock != nil {
		sockErr = sock.Close()
	}
	closeErr := errors.Join(sockErr, srv.Close())
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
