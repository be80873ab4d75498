package netns

import (
	"context"
	"errors"
	"fmt"
	"net"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// listenAttempts bounds how often Listen draws a new kernel-chosen port when
// the IPv4 one is already taken on ::1.
const listenAttempts = 5

// Listen opens TCP listeners inside the network namespace at path ("" means
// the caller's own namespace): one on 127.0.0.1:port and, when the namespace
// has IPv6 loopback, one on [::1] with the same port. Port 0 lets the kernel
// choose the IPv4 port, which the IPv6 listener then reuses; if that port is
// taken on ::1, Listen closes the pair and tries again with a new one, a few
// times. v6 is nil when the namespace has no usable ::1 (IPv6 disabled, as in
// Docker Engine 20.10's containers); the caller decides whether to log that.
// The listeners stay in the namespace; accepting on them works from any
// thread. Connections they accept have TCP keep-alive off: both ends live in
// one namespace on one kernel, so a peer that dies is seen at once (FIN or
// RST), and probes would only cost four setsockopt calls per connection.
//
// The listeners are marked IP_TRANSPARENT (IPV6_TRANSPARENT), which needs
// CAP_NET_ADMIN and changes nothing else for a socket on a local address:
// it is what the relay's restart guard (package iptables) lets SYNs
// through to, and what Gate clears.
func Listen(path string, port uint16) (v4, v6 *net.TCPListener, err error) {
	for attempt := 1; ; attempt++ {
		v4, err = listenIn(path, "tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: int(port)})
		if err != nil {
			return nil, nil, fmt.Errorf("listening on 127.0.0.1:%d in %s: %w", port, nameOf(path), err)
		}
		p := v4.Addr().(*net.TCPAddr).Port
		v6, err = listenIn(path, "tcp6", &net.TCPAddr{IP: net.IPv6loopback, Port: p})
		switch {
		case err == nil:
			return v4, v6, nil
		case noIPv6(err):
			return v4, nil, nil
		case port == 0 && attempt < listenAttempts && errors.Is(err, syscall.EADDRINUSE):
			v4.Close()
		default:
			v4.Close()
			return nil, nil, fmt.Errorf("listening on [::1]:%d in %s: %w", p, nameOf(path), err)
		}
	}
}

// listenIn creates one listening socket inside the namespace (the only
// socket call in the closure) and marks it for the restart guard.
func listenIn(path, network string, addr *net.TCPAddr) (*net.TCPListener, error) {
	lc := net.ListenConfig{KeepAlive: -1}
	var ln net.Listener
	err := Do(path, func() (err error) {
		ln, err = lc.Listen(context.Background(), network, addr.String())
		return err
	})
	if err != nil {
		return nil, err
	}
	tl := ln.(*net.TCPListener)
	// Marked once bound: a transparent socket may bind an address the
	// namespace lacks, and ::1's absence must show as EADDRNOTAVAIL.
	rc, err := tl.SyscallConn()
	if err == nil {
		err = setTransparent(rc, network, 1)
	}
	if err != nil {
		tl.Close()
		return nil, err
	}
	return tl, nil
}

// noIPv6 reports whether err means the namespace has no usable ::1: the
// address is missing (IPv6 disabled on the namespace's interfaces) or the
// kernel has no IPv6 at all.
func noIPv6(err error) bool {
	return errors.Is(err, syscall.EADDRNOTAVAIL) || errors.Is(err, syscall.EAFNOSUPPORT)
}

func nameOf(path string) string {
	if path == "" {
		return "own network namespace"
	}
	return path
}

// Gate stops new connections from reaching ln while it stays open: it
// clears the mark Listen set, so the restart guard drops new SYNs (their
// clients send them again, to the next listener), and connections whose
// handshake was under way still land in ln's accept queue: see Drained.
// For a listener without the mark (no guard), Gate changes nothing.
func Gate(ln *net.TCPListener) error {
	rc, err := ln.SyscallConn()
	if err != nil {
		return err
	}
	network := "tcp4"
	if a, ok := ln.Addr().(*net.TCPAddr); ok && a.IP.To4() == nil {
		network = "tcp6"
	}
	return setTransparent(rc, network, 0)
}

// Drained waits, up to wait, until ln's accept queue is empty, so that
// closing it resets no connection its kernel already took.
func Drained(ln *net.TCPListener, wait time.Duration) error {
	rc, err := ln.SyscallConn()
	if err != nil {
		return err
	}
	deadline := time.Now().Add(wait)
	for {
		var queued uint32
		var serr error
		if err := rc.Control(func(fd uintptr) {
			var info *unix.TCPInfo
			// For a listener the kernel reports its accept queue's
			// length in tcpi_unacked.
			if info, serr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); serr == nil {
				queued = info.Unacked
			}
		}); err != nil {
			return err
		}
		if serr != nil {
			return fmt.Errorf("reading the accept queue: %w", serr)
		}
		if queued == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d connections still queued after %v", queued, wait)
		}
		time.Sleep(time.Millisecond)
	}
}

// setTransparent sets IP_TRANSPARENT or IPV6_TRANSPARENT on c to on.
func setTransparent(c syscall.RawConn, network string, on int) error {
	level, opt, name := unix.SOL_IP, unix.IP_TRANSPARENT, "IP_TRANSPARENT"
	if network == "tcp6" {
		level, opt, name = unix.SOL_IPV6, unix.IPV6_TRANSPARENT, "IPV6_TRANSPARENT"
	}
	var serr error
	if err := c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), level, opt, on) }); err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("setting %s to %d (needs CAP_NET_ADMIN): %w", name, on, serr)
	}
	return nil
}
