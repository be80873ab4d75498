package netns

import (
	"context"
	"errors"
	"fmt"
	"net"
	"syscall"
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

// listenIn creates one listening socket inside the namespace: the only
// socket call in the closure.
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
	return ln.(*net.TCPListener), nil
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
