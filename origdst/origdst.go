// Package origdst reads the destination a client originally asked for on a
// connection that iptables REDIRECT sent to a local listener.
//
// REDIRECT rewrites the destination of the client's packets; conntrack keeps
// the original one, and the SO_ORIGINAL_DST socket option (IPv4) or
// IP6T_SO_ORIGINAL_DST (IPv6) reads it back from the accepted socket.
//
// Typical usage:
//
//	c, _ := ln.AcceptTCP()
//	dst, err := origdst.Get(c)
//	if errors.Is(err, origdst.ErrNotRedirected) {
//		c.Close() // someone dialled the proxy port itself
//	}
//	service := routes[dst.Port()]
package origdst

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ErrNotRedirected means the connection reached the listener directly, not
// through a NAT rule.
var ErrNotRedirected = errors.New("connection was not redirected")

// soOriginalDst is SO_ORIGINAL_DST at SOL_IP and IP6T_SO_ORIGINAL_DST at
// SOL_IPV6: both are 80 in the kernel headers.
const soOriginalDst = 80

// Get returns the original destination of c. A connection that reached the
// listener without a NAT mapping returns an error wrapping ErrNotRedirected:
// either conntrack knows nothing of it (ENOENT), or it reports the
// listener's own address, which is what it does for a direct connection.
//
// It reads the option through c.SyscallConn().Control, so c keeps its only
// descriptor (File would duplicate it and switch it to blocking mode).
func Get(c *net.TCPConn) (netip.AddrPort, error) {
	local, ok := c.LocalAddr().(*net.TCPAddr)
	if !ok || local == nil {
		return netip.AddrPort{}, errors.New("reading original destination: connection has no local address")
	}
	localAP := local.AddrPort()
	level := unix.SOL_IPV6
	if localAP.Addr().Unmap().Is4() {
		level = unix.SOL_IP
	}
	rc, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("reading original destination: %w", err)
	}
	var (
		dst    netip.AddrPort
		optErr error
	)
	if err := rc.Control(func(fd uintptr) {
		dst, optErr = getsockopt(int(fd), level)
	}); err != nil {
		return netip.AddrPort{}, fmt.Errorf("reading original destination: %w", err)
	}
	switch {
	case errors.Is(optErr, unix.ENOENT):
		return netip.AddrPort{}, fmt.Errorf("reading original destination of %v: %w", c.RemoteAddr(), ErrNotRedirected)
	case optErr != nil:
		return netip.AddrPort{}, fmt.Errorf("reading original destination of %v: %w", c.RemoteAddr(), optErr)
	}
	if dst.Addr().Unmap() == localAP.Addr().Unmap() && dst.Port() == localAP.Port() {
		return netip.AddrPort{}, fmt.Errorf("reading original destination of %v: %w", c.RemoteAddr(), ErrNotRedirected)
	}
	return dst, nil
}

// getsockopt asks the kernel for the original destination at level. The
// buffer is big enough for either answer: sockaddr_in (16 bytes) for SOL_IP,
// sockaddr_in6 (28 bytes) for SOL_IPV6.
func getsockopt(fd, level int) (netip.AddrPort, error) {
	var sa unix.RawSockaddrInet6
	size := uint32(unsafe.Sizeof(sa))
	_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), soOriginalDst,
		uintptr(unsafe.Pointer(&sa)), uintptr(unsafe.Pointer(&size)), 0)
	if errno != 0 {
		return netip.AddrPort{}, errno
	}
	return parseSockaddr((*[unix.SizeofSockaddrInet6]byte)(unsafe.Pointer(&sa))[:min(size, unix.SizeofSockaddrInet6)])
}

// parseSockaddr decodes a sockaddr_in or sockaddr_in6 as the kernel wrote it:
// family in host order, port in network order.
func parseSockaddr(b []byte) (netip.AddrPort, error) {
	if len(b) < 2 {
		return netip.AddrPort{}, fmt.Errorf("original destination: short address (%d bytes)", len(b))
	}
	family := binary.NativeEndian.Uint16(b)
	switch {
	case family == unix.AF_INET && len(b) >= unix.SizeofSockaddrInet4:
		port := binary.BigEndian.Uint16(b[2:4])
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[4:8])), port), nil
	case family == unix.AF_INET6 && len(b) >= unix.SizeofSockaddrInet6:
		port := binary.BigEndian.Uint16(b[2:4])
		return netip.AddrPortFrom(netip.AddrFrom16([16]byte(b[8:24])), port), nil
	default:
		return netip.AddrPort{}, fmt.Errorf("original destination: unexpected address family %d (%d bytes)", family, len(b))
	}
}
