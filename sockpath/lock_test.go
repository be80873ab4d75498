package sockpath

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/connectable/connectable/internal/testenv"
)

// TestLock: a second holder of the pin directory is refused with a message
// naming the directory and this process, until the first lets go.
func TestLock(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "connectable")
	l, err := Lock(dir)
	if err != nil {
		t.Fatal(err)
	}
	_, err = Lock(dir)
	if !errors.Is(err, ErrLocked) || !strings.Contains(err.Error(), dir) || !strings.Contains(err.Error(), fmt.Sprintf("PID %d", os.Getpid())) {
		t.Errorf("second Lock: %v; want ErrLocked naming %s and PID %d", err, dir, os.Getpid())
	}
	if _, err := Cleanup(dir); err == nil || !strings.Contains(err.Error(), "not on a bpffs") {
		t.Errorf("Cleanup of a directory outside a bpffs: %v; want a refusal", err)
	}
	if err := l.Unlock(); err != nil {
		t.Fatal(err)
	}
	l2, err := Lock(dir)
	if err != nil {
		t.Fatalf("Lock after Unlock: %v", err)
	}
	l2.Unlock()
}

// TestLockBPFFS: the lock holds on a bpffs, where the pins live, and
// Cleanup empties and removes the directory there.
func TestLockBPFFS(t *testing.T) {
	testenv.NeedRoot(t)
	mnt := t.TempDir()
	if err := unix.Mount("bpf", mnt, "bpf", 0, "mode=0700"); err != nil {
		testenv.Skipf(t, "mounting a bpffs: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(mnt, unix.MNT_DETACH) })
	dir := filepath.Join(mnt, "connectable")
	l, err := Lock(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Lock(dir); !errors.Is(err, ErrLocked) {
		t.Errorf("second Lock on a bpffs: %v; want ErrLocked", err)
	}
	if _, err := Cleanup(dir); !errors.Is(err, ErrLocked) {
		t.Errorf("Cleanup while locked: %v; want ErrLocked", err)
	}
	l.Unlock()
	if _, err := Cleanup(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("after Cleanup, %s: %v; want it gone", dir, err)
	}
}
