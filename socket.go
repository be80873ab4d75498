package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"

	"github.com/connectable/connectable/docker"
	"github.com/connectable/connectable/proxy"
	"github.com/connectable/connectable/reconcile"
	"github.com/connectable/connectable/sockpath"
)

// socketPath is the socket data path with the lock on its pin directory,
// held while it runs.
type socketPath struct {
	*sockpath.Path
	lock *sockpath.DirLock
}

// startSocketPath starts the socket data path as --datapath asks: nil for
// relay; for auto, nil after one log line naming what the kernel or the
// daemon's surroundings lack; for socket, that same cause as an error.
// Another daemon holding --bpf-dir is an error in either mode: two
// daemons would take each other's links and overwrite each other's maps.
func startSocketPath(c *config, log *slog.Logger, res sockpath.Resolver, allowed func(netip.Addr) error, ports *docker.PortTable) (*socketPath, error) {
	if c.datapath == "relay" {
		return nil, nil
	}
	k, lock, err := loadKernel(c)
	if err != nil {
		if errors.Is(err, sockpath.ErrLocked) {
			return nil, err
		}
		if c.datapath == "auto" {
			log.Warn("the socket data path is off; the relay serves every port", "why", err)
			return nil, nil
		}
		return nil, fmt.Errorf("--datapath socket: %w", err)
	}
	// The same bound as the relay's backend sockets.
	bound := c.backendTimeout
	if bound == 0 {
		bound = proxy.DefaultBackendTimeout
	}
	if err := k.SetSilenceBound(bound); err != nil {
		k.Remove()
		return nil, err
	}
	p, err := sockpath.New(sockpath.Config{Kernel: k, Resolver: res, Allowed: allowed, Ports: enginePorts{ports}, Logger: log})
	if err != nil {
		if k.Adopted {
			k.Close() // a previous run's entries keep serving for the next start
		} else {
			k.Remove()
		}
		lock.Unlock()
		return nil, err
	}
	log.Info("the socket data path is on", "pins", c.bpfDir, "adopted", k.Adopted)
	return &socketPath{Path: p, lock: lock}, nil
}

// loadKernel checks what the socket path needs, takes its pin directory
// and loads its programs.
func loadKernel(c *config) (*sockpath.Kernel, *sockpath.DirLock, error) {
	cg, err := sockpath.Prepare(c.bpfDir, c.cgroup2)
	if err != nil {
		return nil, nil, err
	}
	lock, err := sockpath.Lock(c.bpfDir)
	if err != nil {
		return nil, nil, err
	}
	k, err := sockpath.Load(c.bpfDir, cg)
	if err != nil {
		lock.Unlock()
		if errors.Is(err, unix.EPERM) {
			return nil, nil, fmt.Errorf("the kernel refused bpf() (missing CAP_BPF and CAP_SYS_ADMIN, or a locked-down kernel): %w", err)
		}
		return nil, nil, err
	}
	return k, lock, nil
}

// stop lets go of the socket path and leaves it in the kernel: programs
// attached, maps pinned, entries serving, for the next start to adopt,
// so that a restart refuses no connect on the ports it serves. `connectable
// cleanup` removes it.
func (s *socketPath) stop() error {
	return errors.Join(s.Abandon(), s.lock.Unlock())
}

// enginePorts gives the socket path this engine's published ports.
type enginePorts struct{ t *docker.PortTable }

func (e enginePorts) Direct(ctx context.Context, ep netip.AddrPort) ([]sockpath.Direct, error) {
	ds, _, err := e.t.Cached(ctx, ep)
	out := make([]sockpath.Direct, 0, len(ds))
	for _, d := range ds {
		// Not known to allow container-to-container traffic: the
		// published endpoint itself is used.
		out = append(out, sockpath.Direct{Addr: d.Addr, Subnet: d.Subnet, Isolated: !d.ICC})
	}
	return out, err
}

func (e enginePorts) Refresh(ctx context.Context) error { return e.t.Refresh(ctx) }

func (e enginePorts) Changed() <-chan struct{} { return e.t.Changed() }

// firstSweepDeadline bounds how long the first sweep waits for the
// reconciler to settle once the engine's containers are listed: a
// namespace whose set-up is slow (DNS that never answers) must not keep a
// previous run's entries for gone namespaces forever.
const firstSweepDeadline = 30 * time.Second

// sweepWhenSettled removes what a previous run left in the socket path for
// namespaces that are gone, once the first full list from the engine has
// been set up (or has failed once), so that no namespace still on its way
// loses its entries meanwhile; or at the deadline after that list, with a
// warning. listed is closed when the first list was handed over.
func sweepWhenSettled(ctx context.Context, sweep func(), listed <-chan struct{}, rec *reconcile.Reconciler, deadline time.Duration, log *slog.Logger) {
	select {
	case <-ctx.Done():
		return
	case <-listed:
	}
	t := time.NewTimer(deadline)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return
	case <-rec.Settled():
	case <-t.C:
		log.Warn("sweeping a previous run's socket path entries before every namespace is set up", "waited", deadline)
	}
	sweep()
}

// pathsOf lists the data paths in the order the reconciler applies them:
// the socket path first, since its set-up is a few map writes where the
// relay's runs iptables, so a new container's first connect is served
// sooner; a connect it does not rewrite needs the relay, which follows at
// once.
func pathsOf(srv reconcile.Path, sock *socketPath) []reconcile.Path {
	if sock == nil {
		return []reconcile.Path{srv}
	}
	return []reconcile.Path{sock.Path, srv}
}
