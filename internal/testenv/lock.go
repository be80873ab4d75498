package testenv

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// LockDaemons takes the machine-wide lock that every test holding a running
// connectable daemon must hold, and releases it when the test ends. A daemon
// acts on every labelled container the one Docker Engine runs, so two at
// once (from two packages, or two developers' runs) would fight over the
// same namespaces' rules.
func LockDaemons(t testing.TB) {
	t.Helper()
	path := filepath.Join(os.TempDir(), "connectable-daemon-tests.lock")
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatalf("opening %s: %v", path, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		t.Fatalf("locking %s: %v", path, err)
	}
	t.Cleanup(func() {
		_ = unix.Flock(int(f.Fd()), unix.LOCK_UN)
		f.Close()
	})
}
