package sockpath

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// ErrLocked is wrapped by Lock's error when another process holds the pin
// directory.
var ErrLocked = errors.New("another connectable holds the pin directory")

// DirLock is a pin directory held by this process: while a daemon runs,
// no other daemon (nor a cleanup) can take over its links and overwrite
// its maps. It is an flock(2) of the directory itself, since a bpffs holds
// no regular files: it goes with the process, whatever ends it, and it is
// seen by every process that mounts the same bpffs (a daemon in a
// container with the host's /sys/fs/bpf and one on the host).
type DirLock struct {
	f *os.File
}

// Lock creates the pin directory dir if needed and takes it for this
// process, or fails at once, wrapping ErrLocked, naming the holder's PID
// where the kernel tells it.
func Lock(dir string) (*DirLock, error) {
	for range 3 {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("creating the pin directory: %w", err)
		}
		f, err := os.Open(dir)
		if err != nil {
			return nil, fmt.Errorf("opening the pin directory: %w", err)
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			holder := lockHolder(f)
			f.Close()
			if errors.Is(err, unix.EWOULDBLOCK) {
				return nil, fmt.Errorf("%s: %w%s: one daemon per --bpf-dir (stop the other one, or give this one its own --bpf-dir)", dir, ErrLocked, holder)
			}
			return nil, fmt.Errorf("locking the pin directory %s: %w", dir, err)
		}
		// A cleanup may have removed the directory between our open and
		// our lock: then what we hold is no longer what dir names.
		if same, err := sameFile(f, dir); err != nil || !same {
			f.Close()
			continue
		}
		return &DirLock{f: f}, nil
	}
	return nil, fmt.Errorf("locking the pin directory %s: it keeps being removed and created again", dir)
}

// Unlock lets another process take the directory.
func (l *DirLock) Unlock() error {
	if l == nil || l.f == nil {
		return nil
	}
	err := l.f.Close() // closing the last descriptor drops the flock
	l.f = nil
	return err
}

func sameFile(f *os.File, path string) (bool, error) {
	a, err := f.Stat()
	if err != nil {
		return false, err
	}
	b, err := os.Stat(path)
	if err != nil {
		return false, err
	}
	return os.SameFile(a, b), nil
}

// lockHolder returns ", held by PID n" from /proc/locks for the file f, or
// "" when it cannot tell (the holder is in another PID namespace).
func lockHolder(f *os.File) string {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return ""
	}
	locks, err := os.Open("/proc/locks")
	if err != nil {
		return ""
	}
	defer locks.Close()
	// 1: FLOCK  ADVISORY  WRITE 1234 00:2d:5678 0 EOF
	want := fmt.Sprintf("%02x:%02x:%d", unix.Major(st.Dev), unix.Minor(st.Dev), st.Ino)
	sc := bufio.NewScanner(locks)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 6 || f[1] != "FLOCK" || f[4] == "0" {
			continue
		}
		if f[5] == want {
			return ", held by PID " + f[4]
		}
	}
	return ""
}

// Cleanup removes what the socket path left in the kernel under the pin
// directory dir: its links (which detaches its programs from the cgroup2
// root, and frees them) and its maps, then dir itself. It takes dir's
// lock first, so it refuses while a daemon runs. A dir that does not
// exist is clean.
func Cleanup(dir string) (removed []string, err error) {
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	// Only pins are removed: a --bpf-dir mistyped as a directory of
	// files must lose nothing.
	var fs unix.Statfs_t
	if err := unix.Statfs(dir, &fs); err != nil {
		return nil, fmt.Errorf("checking the pin directory %s: %w", dir, err)
	}
	if fs.Type != unix.BPF_FS_MAGIC {
		return nil, fmt.Errorf("%s is not on a bpffs, so it holds no pins of connectable's; nothing removed", dir)
	}
	l, err := Lock(dir)
	if err != nil {
		return nil, err
	}
	defer l.Unlock()
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("reading the pin directory: %w", err)
	}
	var errs []error
	for _, e := range ents {
		p := filepath.Join(dir, e.Name())
		if strings.HasPrefix(e.Name(), "link-") {
			// Unpinning a link that no process holds detaches it. A pin
			// that is not a link (a stray file) is simply removed.
			if l, err := link.LoadPinnedLink(p, nil); err == nil {
				err = errors.Join(l.Unpin(), l.Close())
				if err != nil {
					errs = append(errs, fmt.Errorf("removing %s: %w", p, err))
				} else {
					removed = append(removed, e.Name())
				}
				continue
			}
		}
		if err := os.Remove(p); err != nil {
			errs = append(errs, fmt.Errorf("removing %s: %w", p, err))
			continue
		}
		removed = append(removed, e.Name())
	}
	if err := os.Remove(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("removing the pin directory: %w", err))
	}
	return removed, errors.Join(errs...)
}
