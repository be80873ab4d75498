package sockpath

import (
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/connectable/connectable/internal/testenv"
)

// TestPrepare: a dir that is no cgroup2 mount is named in the error; with
// the real cgroup2 root, Prepare mounts a bpffs where the pin directory's
// parent has none, and finds it there the next time.
func TestPrepare(t *testing.T) {
	notCgroup2 := t.TempDir()
	if _, err := Prepare(filepath.Join(t.TempDir(), "connectable"), notCgroup2); err == nil || !strings.Contains(err.Error(), notCgroup2+" is not a cgroup2 mount") {
		t.Errorf("Prepare with %s: %v; want it named as no cgroup2 mount", notCgroup2, err)
	}

	testenv.NeedRoot(t)
	cg, err := Cgroup2Root()
	if err != nil {
		testenv.Skipf(t, "no cgroup2: %v", err)
	}
	parent := filepath.Join(t.TempDir(), "bpf")
	t.Cleanup(func() { unix.Unmount(parent, unix.MNT_DETACH) })
	for range 2 {
		got, err := Prepare(filepath.Join(parent, "connectable"), "")
		if err != nil {
			t.Fatal(err)
		}
		if got != cg {
			t.Errorf("Prepare found the cgroup2 root %s; want %s", got, cg)
		}
		var fs unix.Statfs_t
		if err := unix.Statfs(parent, &fs); err != nil || fs.Type != unix.BPF_FS_MAGIC {
			t.Fatalf("%s after Prepare: %v, type %x; want a bpffs", parent, err, fs.Type)
		}
	}
	// Mounted once: the second Prepare found the first one's bpffs.
	var st unix.Stat_t
	if err := unix.Stat(parent, &st); err != nil {
		t.Fatal(err)
	}
	if err := unix.Unmount(parent, 0); err != nil {
		t.Fatal(err)
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(parent, &fs); err == nil && fs.Type == unix.BPF_FS_MAGIC {
		t.Errorf("a second bpffs was stacked on %s", parent)
	}
}
