package netns

import (
	"errors"
	"testing"

	"golang.org/x/sys/unix"
)

// The check at the moment of entering does not trust the one made when the
// Handle was: a Handle whose descriptor is the daemon's own namespace (one
// FromFD would have refused) is never entered.
func TestHandleDoRefusesOwnNamespaceAtEntry(t *testing.T) {
	for _, p := range []string{"/proc/self/ns/net", "/proc/1/ns/net"} {
		fd, err := unix.Open(p, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			continue // PID 1 may not be ours to open (a sandbox)
		}
		h := &Handle{name: handlePrefix + "test", origin: p, fd: fd, refs: 1}
		ran := false
		err = h.Do(func() error { ran = true; return nil })
		if !errors.Is(err, ErrForbidden) || ran {
			t.Errorf("Do into %s = %v (fn ran: %v); want ErrForbidden", p, err, ran)
		}
		h.Release()
	}
}
