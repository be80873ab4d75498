package docker

import (
	"context"
	"errors"
	"fmt"
	"strings"

	dockerapi "github.com/fsouza/go-dockerclient"
	"golang.org/x/sys/unix"

	"github.com/connectable/connectable/netns"
)

// openNamespace opens the network namespace of c's main process, once, when
// the container is seen, and makes sure it is the container's: a PID read
// from an inspection may have been reused by the time it is opened (the
// process exited; pid_max wraps), and a namespace opened through it would be
// another tenant's, or the host's.
//
// The process is pinned with a pidfd first, and the namespace taken through
// it (PIDFD_GET_NET_NAMESPACE; on kernels before 6.11, /proc/<pid>/ns/net
// while the pidfd shows the process alive). Then:
//   - Docker reports the container's namespace as NetworkSettings.SandboxKey,
//     a bind mount of it (/var/run/docker/netns/<id>): its inode must be the
//     opened one's.
//   - Where that path is not usable (Podman reports none, or one in a mount
//     namespace the daemon does not see; a container:<id> member has none),
//     the engine is asked again: if it still reports c running as that PID,
//     and the pidfd shows the pinned process still alive, the two are the
//     same process, since two live processes never share a PID.
//
// The host's namespace and the daemon's own are refused (netns.FromFD).
func (w *Watcher) openNamespace(ctx context.Context, c *dockerapi.Container) (*netns.Handle, error) {
	pid := c.State.Pid
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil, fmt.Errorf("opening process %d: %w", pid, err)
	}
	defer unix.Close(pidfd)
	h, err := namespaceOfPidfd(pidfd, pid)
	if err != nil {
		return nil, err
	}
	if err := w.verifyNamespace(ctx, c, pidfd, h); err != nil {
		h.Release()
		return nil, err
	}
	return h, nil
}

func namespaceOfPidfd(pidfd, pid int) (*netns.Handle, error) {
	origin := netnsPath(pid)
	fd, err := unix.IoctlRetInt(pidfd, unix.PIDFD_GET_NET_NAMESPACE)
	if err == nil {
		return netns.FromFD(fd, origin)
	}
	if !errors.Is(err, unix.ENOTTY) && !errors.Is(err, unix.EINVAL) {
		return nil, fmt.Errorf("network namespace of process %d: %w", pid, err)
	}
	h, err := netns.Open(origin)
	if err != nil {
		return nil, err
	}
	if !alive(pidfd) {
		h.Release()
		return nil, fmt.Errorf("network namespace of process %d: the process exited while it was opened", pid)
	}
	return h, nil
}

// alive reports whether the process of pidfd has not exited.
func alive(pidfd int) bool { return unix.PidfdSendSignal(pidfd, 0, nil, 0) == nil }

// errNotContainers says an opened namespace is not the container's.
var errNotContainers = errors.New("not the container's network namespace")

func (w *Watcher) verifyNamespace(ctx context.Context, c *dockerapi.Container, pidfd int, h *netns.Handle) error {
	if key := sandboxKey(c); key != "" {
		if ino := pathInode(key); ino != 0 {
			if ino != h.Inode() {
				return fmt.Errorf("process %d is in namespace %d, the sandbox %s is %d: %w (its PID was reused?)",
					c.State.Pid, h.Inode(), key, ino, errNotContainers)
			}
			return nil
		}
	}
	again, err := w.inspect(ctx, c.ID)
	if err != nil {
		return fmt.Errorf("verifying the network namespace: %w", err)
	}
	if !again.State.Running || again.State.Pid != c.State.Pid {
		return fmt.Errorf("the container's process changed from %d while its namespace was opened: %w", c.State.Pid, errNotContainers)
	}
	if !alive(pidfd) {
		return fmt.Errorf("process %d exited while its namespace was opened: %w", c.State.Pid, errNotContainers)
	}
	return nil
}

func sandboxKey(c *dockerapi.Container) string {
	if c.NetworkSettings == nil {
		return ""
	}
	return strings.TrimSpace(c.NetworkSettings.SandboxKey)
}
