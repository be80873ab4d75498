package origdst

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/connectable/connectable/internal/testenv"
	"github.com/connectable/connectable/netns"
)

func TestParseSockaddr(t *testing.T) {
	v4 := make([]byte, unix.SizeofSockaddrInet4)
	binary.NativeEndian.PutUint16(v4, unix.AF_INET)
	binary.BigEndian.PutUint16(v4[2:], 6000)
	copy(v4[4:], []byte{198, 18, 0, 1})

	v6 := make([]byte, unix.SizeofSockaddrInet6)
	binary.NativeEndian.PutUint16(v6, unix.AF_INET6)
	binary.BigEndian.PutUint16(v6[2:], 8500)
	ip6 := netip.MustParseAddr("fd00:cafe::1").As16()
	copy(v6[8:], ip6[:])

	tests := []struct {
		name    string
		in      []byte
		want    netip.AddrPort
		wantErr bool
	}{
		{name: "ipv4", in: v4, want: netip.MustParseAddrPort("198.18.0.1:6000")},
		{name: "ipv6", in: v6, want: netip.MustParseAddrPort("[fd00:cafe::1]:8500")},
		{name: "short ipv6", in: v6[:16], wantErr: true},
		{name: "empty", in: nil, wantErr: true},
		{name: "unknown family", in: make([]byte, 16), wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseSockaddr(tt.in)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v; want error %v", err, tt.wantErr)
			}
			if got != tt.want {
				t.Errorf("got %v; want %v", got, tt.want)
			}
		})
	}
}

// pair returns both ends of a TCP connection made inside ns ("" = here) to a
// listener on addr, and the listener's port.
func pair(t *testing.T, ns, listenAddr string, dialAddr func(port int) string) (server *net.TCPConn) {
	t.Helper()
	var ln *net.TCPListener
	if err := netns.Do(ns, func() error {
		l, err := net.Listen("tcp", listenAddr)
		if err == nil {
			ln = l.(*net.TCPListener)
		}
		return err
	}); err != nil {
		testenv.Skipf(t, "cannot listen on %s: %v", listenAddr, err)
	}
	defer ln.Close()
	var client net.Conn
	if err := netns.Do(ns, func() (err error) {
		client, err = net.DialTimeout("tcp", dialAddr(ln.Addr().(*net.TCPAddr).Port), 10*time.Second)
		return err
	}); err != nil {
		t.Fatalf("dialling: %v", err)
	}
	t.Cleanup(func() { client.Close() })
	_ = ln.SetDeadline(time.Now().Add(10 * time.Second))
	server, err := ln.AcceptTCP()
	if err != nil {
		t.Fatalf("accepting: %v", err)
	}
	t.Cleanup(func() { server.Close() })
	return server
}

func TestDirectConnectionIsNotRedirected(t *testing.T) {
	// Whether conntrack runs in this namespace or not, a direct connection
	// must come out as ErrNotRedirected (ENOENT, or the local address back).
	for _, fam := range []struct{ listen, host string }{{"127.0.0.1:0", "127.0.0.1"}, {"[::1]:0", "::1"}} {
		t.Run(fam.host, func(t *testing.T) {
			server := pair(t, "", fam.listen, func(p int) string { return net.JoinHostPort(fam.host, strconv.Itoa(p)) })
			if dst, err := Get(server); !errors.Is(err, ErrNotRedirected) {
				t.Errorf("Get = %v, %v; want ErrNotRedirected", dst, err)
			}
		})
	}
}

func TestRedirectedConnection(t *testing.T) {
	testenv.NeedRoot(t)
	testenv.GuardRootRules(t)
	testenv.NeedCommand(t, "iptables-nft", "ip6tables-nft")
	ns := testenv.NewNetNS(t)
	// No nat table yet, so no conntrack in the namespace: the kernel answers
	// ENOENT.
	server := pair(t, ns, "127.0.0.1:0", func(p int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(p)) })
	if dst, err := Get(server); !errors.Is(err, ErrNotRedirected) {
		t.Errorf("direct without conntrack: Get = %v, %v; want ErrNotRedirected", dst, err)
	}
	for _, fam := range []struct {
		prog, listen, host string
	}{
		{"iptables-nft", "127.0.0.1:0", "127.0.0.1"},
		{"ip6tables-nft", "[::1]:0", "::1"},
	} {
		t.Run(fam.host, func(t *testing.T) {
			server := pair(t, ns, fam.listen, func(p int) string {
				// REDIRECT 6000 to the listener, written by hand so this
				// package's tests stand on their own.
				testenv.Exec(t, ns, fam.prog, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "6000",
					"-j", "REDIRECT", "--to-ports", strconv.Itoa(p))
				return net.JoinHostPort(fam.host, "6000")
			})
			dst, err := Get(server)
			if err != nil {
				t.Fatalf("Get: %v", err)
			}
			if want := netip.MustParseAddrPort(net.JoinHostPort(fam.host, "6000")); dst != want {
				t.Errorf("Get = %v; want %v", dst, want)
			}
		})
	}
	// With the nat table in use conntrack tracks everything: a direct
	// connection now reports the listener's own address, still not redirected.
	server = pair(t, ns, "127.0.0.1:0", func(p int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(p)) })
	if dst, err := Get(server); !errors.Is(err, ErrNotRedirected) {
		t.Errorf("direct with conntrack: Get = %v, %v; want ErrNotRedirected", dst, err)
	}
}

func TestGetKeepsDescriptor(t *testing.T) {
	// Control, not File: no descriptor is duplicated and the connection
	// stays usable.
	server := pair(t, "", "127.0.0.1:0", func(p int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(p)) })
	before := testenv.OpenFDs(t)
	for range 10 {
		_, _ = Get(server)
	}
	if after := testenv.OpenFDs(t); after != before {
		t.Errorf("descriptors: %d before, %d after", before, after)
	}
	if err := server.SetDeadline(time.Now().Add(time.Second)); err != nil {
		t.Errorf("connection unusable after Get: %v", err)
	}
}
