package testenv

import (
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"
)

// Blackhole returns a loopback address whose SYNs the kernel drops: a
// socket listening with backlog 0 whose accept queue is already full, so a
// connect there hangs until the dialer's timeout, like a host that has
// vanished. It checks that a dial really hangs there.
func Blackhole(t testing.TB) netip.AddrPort {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	addr := netip.AddrPortFrom(netip.AddrFrom4(sa.(*syscall.SockaddrInet4).Addr), uint16(sa.(*syscall.SockaddrInet4).Port))
	// Fill the queue: connections complete until it is full, then the
	// kernel drops SYNs and a dial hangs.
	for i := 0; ; i++ {
		if i == 16 {
			t.Fatalf("dials to %s never started hanging", addr)
		}
		c, err := net.DialTimeout("tcp4", addr.String(), 300*time.Millisecond)
		if err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				return addr
			}
			t.Fatalf("filling the queue of %s: %v", addr, err)
		}
		t.Cleanup(func() { c.Close() })
	}
}
