package proxy

import (
	"net/netip"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
	"golang.org/x/sys/unix"
)

// The backend socket carries the operator's bound on silence: the kernel's
// TCP_USER_TIMEOUT and keepalive probes that add up to it.
func TestBoundSilence(t *testing.T) {
	be := testenv.StartBackend(t, testenv.Echo)
	for _, tc := range []struct {
		timeout     time.Duration
		userTimeout int // ms; 0: left alone
		idle        int // s
	}{
		{30 * time.Second, 30000, 15},
		{0, int(DefaultBackendTimeout.Milliseconds()), int(DefaultBackendTimeout.Seconds() / 2)},
		{-1, 0, 0},
	} {
		// The backend is on loopback, which the policy refuses by default.
		s := &Server{BackendTimeout: tc.timeout, AllowTargets: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}}
		s.init()
		c, err := s.dialEndpoint(t.Context(), be.Addr)
		if err != nil {
			t.Fatal(err)
		}
		raw, _ := c.SyscallConn()
		var ut, idle, ka int
		_ = raw.Control(func(fd uintptr) {
			ut, _ = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT)
			idle, _ = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_KEEPIDLE)
			ka, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_KEEPALIVE)
		})
		c.Close()
		if ut != tc.userTimeout {
			t.Errorf("BackendTimeout %v: TCP_USER_TIMEOUT %d ms; want %d", tc.timeout, ut, tc.userTimeout)
		}
		if tc.idle > 0 && (ka != 1 || idle != tc.idle) {
			t.Errorf("BackendTimeout %v: keepalive %d, idle %d s; want on, %d s", tc.timeout, ka, idle, tc.idle)
		}
		if tc.idle == 0 && ka != 0 {
			t.Errorf("BackendTimeout %v: keepalive on; want the kernel's default (off)", tc.timeout)
		}
	}
}
