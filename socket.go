package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/connectable/connectable/docker"
	"github.com/connectable/connectable/reconcile"
	"github.com/connectable/connectable/sockpath"
)

// startSocketPath starts the socket data path as --datapath asks: nil for
// relay; for auto, nil after one log line naming what the kernel or the
// daemon's surroundings lack; for socket, that same cause as an error.
func startSocketPath(c *config, log *slog.Logger, res sockpath.Resolver, allowed func(netip.Addr) error, ports *docker.PortTable) (*sockpath.Path, error) {
	if c.datapath == "relay" {
		return nil, nil
	}
	k, err := loadKernel(c)
	if err != nil {
		if c.datapath == "auto" {
			log.Warn("the socket data path is off; the relay serves every port", "why", err)
			return nil, nil
		}
		return nil, fmt.Errorf("--datapath socket: %w", err)
	}
	if err := k.SetSilenceBound(c.backendTimeout); err != nil {
		k.Remove()
		return nil, err
	}
	p, err := sockpath.New(sockpath.Config{Kernel: k, Resolver: res, Allowed: allowed, Ports: enginePorts{ports}, Logger: log})
	if err != nil {
		k.Remove()
		return nil, err
	}
	log.Info("the socket data path is on", "pins", c.bpfDir, "adopted", k.Adopted)
	return p, nil
}

// loadKernel checks what the socket path needs, in the order an operator
// would fix it, and loads its programs.
func loadKernel(c *config) (*sockpath.Kernel, error) {
	cg := c.cgroup2
	if cg == "" {
		var err error
		if cg, err = sockpath.Cgroup2Root(); err != nil {
			// A container on a cgroup v1 host sees only v1
			// hierarchies; with the host's cgroup namespace, a mount
			// of its own shows the whole cgroup2 hierarchy.
			if cg, err = mountCgroup2(); err != nil {
				return nil, err
			}
		}
	}
	if err := sockpath.CheckCgroup2(cg); err != nil {
		return nil, err
	}
	if own, host, err := cgroupNamespaces(); err == nil && own != host {
		return nil, errors.New("the daemon's cgroup namespace is not the host's, so its programs would see only its own processes (as a container: --cgroupns=host)")
	}
	if err := ensureBPFFS(filepath.Dir(c.bpfDir)); err != nil {
		return nil, err
	}
	k, err := sockpath.Load(c.bpfDir, cg)
	if errors.Is(err, unix.EPERM) {
		return nil, fmt.Errorf("the kernel refused bpf() (missing CAP_BPF and CAP_SYS_ADMIN, or a locked-down kernel): %w", err)
	}
	return k, err
}

// cgroupNamespaces returns the daemon's cgroup namespace and that of PID 1,
// the host's init once preflight saw the host's processes.
func cgroupNamespaces() (own, host string, err error) {
	if own, err = os.Readlink("/proc/self/ns/cgroup"); err != nil {
		return "", "", err
	}
	host, err = os.Readlink("/proc/1/ns/cgroup")
	return own, host, err
}

// ensureBPFFS mounts a bpffs at dir unless one is there. A bpffs of the
// host's mount namespace is what lets pins outlive the daemon; as a
// container, mount the host's /sys/fs/bpf into it.
func ensureBPFFS(dir string) error {
	var fs unix.Statfs_t
	if err := unix.Statfs(dir, &fs); err == nil && fs.Type == unix.BPF_FS_MAGIC {
		return nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("no bpffs at %s, and creating it failed: %w", dir, err)
	}
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("no bpffs at %s, and mounting one failed (as a container: -v /sys/fs/bpf:/sys/fs/bpf): %w", dir, err)
	}
	return nil
}

// cgroup2Mount is where the daemon mounts cgroup2 when none is mounted.
const cgroup2Mount = "/run/connectable/cgroup2"

func mountCgroup2() (string, error) {
	if sockpath.CheckCgroup2(cgroup2Mount) == nil {
		return cgroup2Mount, nil // a previous run's
	}
	if err := os.MkdirAll(cgroup2Mount, 0o700); err != nil {
		return "", fmt.Errorf("no cgroup2 file system is mounted, and creating %s failed: %w", cgroup2Mount, err)
	}
	if err := unix.Mount("none", cgroup2Mount, "cgroup2", 0, ""); err != nil {
		return "", fmt.Errorf("no cgroup2 file system is mounted, and mounting one at %s failed: %w", cgroup2Mount, err)
	}
	return cgroup2Mount, nil
}

// enginePorts gives the socket path this engine's published ports.
type enginePorts struct{ t *docker.PortTable }

func (e enginePorts) Direct(ctx context.Context, ep netip.AddrPort) ([]sockpath.Direct, error) {
	ds, _, err := e.t.Cached(ctx, ep)
	out := make([]sockpath.Direct, 0, len(ds))
	for _, d := range ds {
		out = append(out, sockpath.Direct{Addr: d.Addr, Subnet: d.Subnet})
	}
	return out, err
}

func (e enginePorts) Refresh(ctx context.Context) error { return e.t.Refresh(ctx) }

func (e enginePorts) Changed() <-chan struct{} { return e.t.Changed() }

// sweepWhenSettled removes what a previous run left in the socket path for
// namespaces that are gone, once the first full list from the engine has
// been set up (or has failed once), so that no namespace still on its way
// loses its entries meanwhile.
func sweepWhenSettled(ctx context.Context, p *sockpath.Path, w *docker.Watcher, rec *reconcile.Reconciler) {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if w.Stats().Resyncs == 0 {
			continue
		}
		settled := true
		for _, st := range rec.Status() {
			if !st.Applied && st.Err == "" {
				settled = false
				break
			}
		}
		if settled {
			p.Sweep()
			return
		}
	}
}

// pathsOf lists the data paths in the order the reconciler applies them:
// the socket path first, since its set-up is a few map writes where the
// relay's runs iptables, so a new container's first connect is served
// sooner; a connect it does not rewrite needs the relay, which follows at
// once.
func pathsOf(srv reconcile.Path, sock *sockpath.Path) []reconcile.Path {
	if sock == nil {
		return []reconcile.Path{srv}
	}
	return []reconcile.Path{sock, srv}
}
