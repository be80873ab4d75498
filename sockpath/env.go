package sockpath

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// Cgroup2Mount is where Prepare mounts cgroup2 when none is mounted.
const Cgroup2Mount = "/run/connectable/cgroup2"

// Prepare checks what the socket path needs of the daemon's surroundings,
// in the order an operator would fix it, mounting what it may: it returns
// the cgroup2 root to attach to (cgroup, or the one found among the
// mounts if cgroup is ""), once a bpffs is mounted at the parent of the
// pin directory dir. Each error names what is missing and how to give it.
func Prepare(dir, cgroup string) (string, error) {
	if cgroup == "" {
		var err error
		if cgroup, err = Cgroup2Root(); err != nil {
			// A container on a cgroup v1 host sees only v1
			// hierarchies; with the host's cgroup namespace, a mount
			// of its own shows the whole cgroup2 hierarchy.
			if cgroup, err = mountCgroup2(Cgroup2Mount); err != nil {
				return "", err
			}
		}
	}
	if err := CheckCgroup2(cgroup); err != nil {
		return "", err
	}
	if own, host, err := cgroupNamespaces(); err == nil && own != host {
		return "", errors.New("the daemon's cgroup namespace is not the host's, so its programs would see only its own processes (as a container: --cgroupns=host)")
	}
	if err := ensureBPFFS(filepath.Dir(dir)); err != nil {
		return "", err
	}
	return cgroup, nil
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

// mountCgroup2 mounts cgroup2 at dir, or finds a previous run's mount
// there.
func mountCgroup2(dir string) (string, error) {
	if CheckCgroup2(dir) == nil {
		return dir, nil // a previous run's
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("no cgroup2 file system is mounted, and creating %s failed: %w", dir, err)
	}
	if err := unix.Mount("none", dir, "cgroup2", 0, ""); err != nil {
		return "", fmt.Errorf("no cgroup2 file system is mounted, and mounting one at %s failed: %w", dir, err)
	}
	return dir, nil
}
