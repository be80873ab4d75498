package sockpath

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/connectable/connectable/netns"
)

// connectFrom opens a TCP connection to ap from the namespace ns and
// closes it, within timeout: whether a connect of the namespace's own
// would complete. The socket is made inside the namespace and connected
// from outside it, so that no thread stays in the namespace while the
// handshake runs.
func connectFrom(ctx context.Context, ns string, ap netip.AddrPort, timeout time.Duration) error {
	family, sa := sockaddr(ap)
	fd := -1
	err := netns.Do(ns, func() error {
		var err error
		fd, err = unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
		return err
	})
	if err != nil {
		return fmt.Errorf("opening a socket in %s: %w", netns.Describe(ns), err)
	}
	// A reset, not a FIN, when the check hangs up: no TIME_WAIT is left
	// in the namespace for each check.
	_ = unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
	// Registered with the poller before the connect starts, so that the
	// handshake's completion cannot come before the poller waits for it.
	f := os.NewFile(uintptr(fd), "reach "+ap.String())
	defer f.Close()
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	if err := f.SetWriteDeadline(time.Now().Add(timeout)); err != nil {
		return err
	}
	stop := context.AfterFunc(ctx, func() { f.SetWriteDeadline(time.Unix(1, 0)) })
	defer stop()
	var connErr error
	first := true
	werr := rc.Write(func(fd uintptr) bool {
		if first {
			first = false
			err := unix.Connect(int(fd), sa)
			if errors.Is(err, unix.EINPROGRESS) {
				return false // wait for the handshake
			}
			connErr = err
			return true
		}
		v, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ERROR)
		switch {
		case err != nil:
			connErr = err
			return true
		case v != 0 && v != int(unix.EINPROGRESS) && v != int(unix.EALREADY) && v != int(unix.EINTR):
			connErr = unix.Errno(v)
			return true
		}
		// Writable with no error can still be a connect in progress;
		// a peer name says it completed.
		if _, err := unix.Getpeername(int(fd)); err == nil {
			return true
		}
		return false
	})
	if werr != nil {
		if errors.Is(werr, os.ErrDeadlineExceeded) {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("no answer within %v", timeout)
		}
		return werr
	}
	return connErr
}

// unverify forgets that the namespace with cookie connected to ep, so that
// its next decision checks again before writing ep into its tables. The
// health code calls it when a connect of the namespace to ep failed; it
// does not decide again by itself (the table's dead marks handle the
// failure meanwhile). Called with p.mu.
func (p *Path) unverify(cookie uint64, ep netip.AddrPort) {
	for _, sp := range p.spaces {
		if sp.cookie != cookie {
			continue
		}
		for _, eps := range sp.reached {
			delete(eps, ep)
		}
	}
}

// sockaddr returns the family and socket address of ap.
func sockaddr(ap netip.AddrPort) (int, unix.Sockaddr) {
	a := ap.Addr().Unmap()
	if a.Is4() {
		return unix.AF_INET, &unix.SockaddrInet4{Port: int(ap.Port()), Addr: a.As4()}
	}
	return unix.AF_INET6, &unix.SockaddrInet6{Port: int(ap.Port()), Addr: a.As16()}
}
