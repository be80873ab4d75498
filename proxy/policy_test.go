package proxy

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
)

func TestTargetPolicy(t *testing.T) {
	pfx := func(s ...string) []netip.Prefix {
		var out []netip.Prefix
		for _, p := range s {
			out = append(out, netip.MustParsePrefix(p))
		}
		return out
	}
	cases := []struct {
		name        string
		allow, deny []netip.Prefix
		addr        string
		refused     bool
	}{
		{"loopback", nil, nil, "127.0.0.1", true},
		{"loopback elsewhere in 127/8", nil, nil, "127.5.6.7", true},
		{"v6 loopback", nil, nil, "::1", true},
		{"v4-mapped loopback", nil, nil, "::ffff:127.0.0.1", true},
		{"metadata", nil, nil, "169.254.169.254", true},
		{"v4-mapped metadata", nil, nil, "::ffff:169.254.169.254", true},
		{"v6 link-local", nil, nil, "fe80::1", true},
		{"v6 link-local with zone", nil, nil, "fe80::1%eth0", true},
		{"unspecified", nil, nil, "0.0.0.0", true},
		{"v6 unspecified", nil, nil, "::", true},
		{"multicast", nil, nil, "239.1.2.3", true},
		{"v6 multicast", nil, nil, "ff02::1", true},
		{"broadcast", nil, nil, "255.255.255.255", true},
		{"LAN", nil, nil, "192.168.1.10", false},
		{"bridge", nil, nil, "172.17.0.2", false},
		{"public v6", nil, nil, "2001:db8::1", false},
		{"allowed loopback", pfx("127.0.0.0/8"), nil, "127.0.0.1", false},
		{"allowed loopback, mapped", pfx("127.0.0.0/8"), nil, "::ffff:127.0.0.1", false},
		{"allow given mapped", pfx("::ffff:127.0.0.0/104"), nil, "127.0.0.1", false},
		{"allow narrower than default", pfx("127.0.0.1/32"), nil, "127.0.0.2", true},
		{"deny more specific than allow", pfx("127.0.0.0/8"), pfx("127.0.0.2/32"), "127.0.0.2", true},
		{"allow more specific than deny", pfx("127.0.0.1/32"), pfx("127.0.0.0/8"), "127.0.0.1", false},
		{"tie: deny wins", pfx("10.0.0.0/8"), pfx("10.0.0.0/8"), "10.1.2.3", true},
		{"denied bridge", nil, pfx("172.17.0.0/16"), "172.17.0.2", true},
		{"other bridge", nil, pfx("172.17.0.0/16"), "172.18.0.2", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := newTargetPolicy(tc.allow, tc.deny).check(netip.MustParseAddr(tc.addr))
			if got := errors.Is(err, ErrTargetRefused); got != tc.refused {
				t.Errorf("check(%s): got %v; want refused %v", tc.addr, err, tc.refused)
			}
		})
	}
}

func TestParsePrefixes(t *testing.T) {
	got, err := ParsePrefixes(" 10.0.0.0/8, fd00::/8,192.0.2.1 ,")
	if err != nil || len(got) != 3 || got[2] != netip.MustParsePrefix("192.0.2.1/32") {
		t.Errorf("got %v, %v; want 3 prefixes, the last 192.0.2.1/32", got, err)
	}
	for _, bad := range []string{"10.0.0.0/33", "nope", "10.0.0.0/8,x/8"} {
		if _, err := ParsePrefixes(bad); err == nil || !strings.Contains(err.Error(), "not a CIDR prefix") {
			t.Errorf("ParsePrefixes(%q): %v; want an error naming the bad value", bad, err)
		}
	}
}

// TestRefusedTargetSkipped: a refused endpoint is skipped for the next one
// without a dial, counted, logged once per namespace, shown in the status,
// and never put in back-off.
func TestRefusedTargetSkipped(t *testing.T) {
	testenv.CheckGoroutines(t)
	a := testenv.StartBackend(t, tagEcho('a'))
	refused := netip.MustParseAddrPort("127.0.0.2:9")
	res := newResolver(false)
	res.set("svc", refused, a.Addr)
	logs := &testenv.SyncBuffer{}
	s := newServer(t, res, func(s *Server) {
		s.DenyTargets = []netip.Prefix{netip.MustParsePrefix("127.0.0.2/32")}
		s.Logger = testenv.Logger(t, logs)
	})
	if err := s.Apply(context.Background(), "c1", "", map[uint16]string{6000: "svc"}); err != nil {
		t.Fatal(err)
	}
	addr := proxyAddr(t, s, "c1")
	for range 3 {
		c := dialPort(t, addr, 6000)
		if got := readTag(t, c); got != 'a' {
			t.Fatalf("reached %q; want a", got)
		}
		c.Close()
	}
	st := s.Stats()
	if got := st.Services["svc"].Refused; got != 3 {
		t.Errorf("refused: got %d; want 3", got)
	}
	if st.DialFailures[refused] != 0 || st.Failovers != 0 {
		t.Errorf("dial failures of the refused endpoint %d, failovers %d; want 0 and 0", st.DialFailures[refused], st.Failovers)
	}
	if n := logs.Count("endpoint refused by the target policy"); n != 1 {
		t.Errorf("%d log lines about the refusal; want 1", n)
	}
	eps := s.Namespaces()[0].Routes[0].Endpoints
	if len(eps) != 2 || !eps[0].Refused || eps[0].Failures != 0 || !strings.Contains(eps[0].LastError, "--deny-targets 127.0.0.2/32") {
		t.Errorf("status: %+v; want the first refused, naming the rule, without failures", eps)
	}
	if eps[1].Refused || !eps[1].Healthy {
		t.Errorf("status of a: %+v", eps[1])
	}
}

// TestTargetPolicyDefaultRefusesLoopback: without AllowTargets, a backend
// on loopback is never connected to.
func TestTargetPolicyDefaultRefusesLoopback(t *testing.T) {
	testenv.CheckGoroutines(t)
	a := testenv.StartBackend(t, tagEcho('a'))
	res := newResolver(false)
	res.set("svc", a.Addr)
	s := newServer(t, res, func(s *Server) { s.AllowTargets = nil })
	if err := s.Apply(context.Background(), "c1", "", map[uint16]string{6000: "svc"}); err != nil {
		t.Fatal(err)
	}
	expectClosed(t, dialPort(t, proxyAddr(t, s, "c1"), 6000), 10*time.Second)
	waitFor(t, "the connection to fail", func() bool { return s.Stats().Services["svc"].Failed == 1 })
	if n := a.Accepted.Load(); n != 0 {
		t.Errorf("the loopback backend accepted %d connections", n)
	}
	// The dialer's own check, for a Dial that bypasses dialEndpoint's.
	if err := s.policy.control("tcp4", a.Addr.String(), nil); !errors.Is(err, ErrTargetRefused) {
		t.Errorf("control(%s): %v; want refused", a.Addr, err)
	}
}

func TestLocalDialError(t *testing.T) {
	for _, errno := range []syscall.Errno{syscall.EADDRNOTAVAIL, syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS} {
		if !localDialError(&wrapErr{errno}) {
			t.Errorf("%v: not a local error", errno)
		}
	}
	for _, errno := range []syscall.Errno{syscall.ECONNREFUSED, syscall.ETIMEDOUT, syscall.EHOSTUNREACH} {
		if localDialError(&wrapErr{errno}) {
			t.Errorf("%v: a local error", errno)
		}
	}
}

type wrapErr struct{ err error }

func (e *wrapErr) Error() string { return "dial tcp: " + e.err.Error() }
func (e *wrapErr) Unwrap() error { return e.err }
