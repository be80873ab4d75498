package resolver

import (
	"context"
	"errors"
	"fmt"
	"github.com/connectable/connectable/internal/testenv"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// testServer is an in-process DNS server on 127.0.0.1, UDP and TCP on the
// same port (a truncated UDP reply is retried over TCP at the same address),
// with its own handler rather than miekg's global mux, so parallel tests do
// not interfere.
type testServer struct {
	Addr    string
	handle  atomic.Pointer[handleFunc]
	queries atomic.Int64

	mu  sync.Mutex
	log []queryRecord

	stopOnce sync.Once
	stop     func()
}

// handleFunc answers one query; nil means no reply (the client times out).
type handleFunc func(req *dns.Msg, network string) *dns.Msg

// queryRecord is what the server saw of one query.
type queryRecord struct {
	Name    string
	Type    string
	Network string
	EDNS    uint16 // advertised UDP size, 0 without EDNS0
}

func (q queryRecord) String() string {
	return fmt.Sprintf("%s %s %s edns=%d", q.Network, q.Type, q.Name, q.EDNS)
}

func startServer(t testing.TB, h handleFunc) *testServer {
	t.Helper()
	s := &testServer{}
	s.setHandler(h)
	s.Addr, s.stop = serveLoopback(t, dns.HandlerFunc(s.serveDNS))
	t.Cleanup(s.Stop)
	return s
}

// serveLoopback serves h over UDP and TCP on one loopback port and returns
// the address and a function that stops both servers and waits for them.
func serveLoopback(t testing.TB, h dns.Handler) (addr string, stop func()) {
	t.Helper()
	var pc net.PacketConn
	var ln net.Listener
	for attempt := 0; ; attempt++ {
		var err error
		pc, err = net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("listening on udp: %v", err)
		}
		ln, err = net.Listen("tcp", pc.LocalAddr().String())
		if err == nil {
			break
		}
		pc.Close()
		if attempt == 20 {
			t.Fatalf("no port free for both udp and tcp: %v", err)
		}
	}
	var wg sync.WaitGroup
	var servers []*dns.Server
	for _, srv := range []*dns.Server{{PacketConn: pc, Handler: h}, {Listener: ln, Handler: h}} {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		wg.Go(func() {
			if err := srv.ActivateAndServe(); err != nil {
				t.Errorf("dns test server: %v", err)
			}
		})
		select {
		case <-started:
		case <-time.After(10 * time.Second):
			t.Fatalf("dns test server did not start")
		}
		servers = append(servers, srv)
	}
	return pc.LocalAddr().String(), func() {
		for _, srv := range servers {
			if err := srv.Shutdown(); err != nil {
				t.Errorf("stopping dns test server: %v", err)
			}
		}
		wg.Wait()
	}
}

// Stop shuts the server down; queries to its port are then refused.
func (s *testServer) Stop() { s.stopOnce.Do(s.stop) }

func (s *testServer) setHandler(h handleFunc) { s.handle.Store(&h) }

func (s *testServer) serveDNS(w dns.ResponseWriter, req *dns.Msg) {
	s.queries.Add(1)
	rec := queryRecord{Network: w.RemoteAddr().Network()}
	if len(req.Question) == 1 {
		rec.Name, rec.Type = req.Question[0].Name, dns.TypeToString[req.Question[0].Qtype]
	}
	if opt := req.IsEdns0(); opt != nil {
		rec.EDNS = opt.UDPSize()
	}
	s.mu.Lock()
	s.log = append(s.log, rec)
	s.mu.Unlock()
	if reply := (*s.handle.Load())(req, rec.Network); reply != nil {
		_ = w.WriteMsg(reply)
	}
}

// Queries returns what the server has seen so far.
func (s *testServer) Queries() []queryRecord {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]queryRecord(nil), s.log...)
}

// zone is a static set of records served by name and type. Extra holds, per
// SRV owner name, the exact additional section to send with its SRV answer,
// so tests control presence, order and mixing of glue.
type zone struct {
	Records []dns.RR
	Extra   map[string][]dns.RR
}

func (z *zone) handle(req *dns.Msg, _ string) *dns.Msg {
	q := req.Question[0]
	m := new(dns.Msg)
	m.SetReply(req)
	m.Authoritative = true
	exists := false
	for _, rr := range z.Records {
		if strings.EqualFold(rr.Header().Name, q.Name) {
			exists = true
			if rr.Header().Rrtype == q.Qtype || rr.Header().Rrtype == dns.TypeCNAME {
				m.Answer = append(m.Answer, rr)
			}
		}
	}
	if !exists {
		m.Rcode = dns.RcodeNameError
	}
	if q.Qtype == dns.TypeSRV {
		m.Extra = append(m.Extra, z.Extra[strings.ToLower(q.Name)]...)
	}
	if req.IsEdns0() != nil {
		m.SetEdns0(4096, false)
	}
	return m
}

// rcodeHandler answers every query with rcode.
func rcodeHandler(rcode int) handleFunc {
	return func(req *dns.Msg, _ string) *dns.Msg {
		m := new(dns.Msg)
		m.SetRcode(req, rcode)
		return m
	}
}

func rr(t testing.TB, s string) dns.RR {
	t.Helper()
	r, err := dns.NewRR(s)
	if err != nil {
		t.Fatalf("parsing record %q: %v", s, err)
	}
	return r
}

func rrs(t testing.TB, ss ...string) []dns.RR {
	t.Helper()
	out := make([]dns.RR, len(ss))
	for i, s := range ss {
		out[i] = rr(t, s)
	}
	return out
}

// lookupsAtOnce starts n concurrent lookups of svc. wait waits for them all
// and returns the first error, or one for an answer without wantLen
// endpoints.
func lookupsAtOnce(r *Resolver, svc string, n, wantLen int) (wait func() error) {
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for range n {
		wg.Go(func() {
			eps, err := r.Lookup(context.Background(), svc)
			if err == nil && len(eps) != wantLen {
				err = fmt.Errorf("got %v", eps)
			}
			errs <- err
		})
	}
	return func() error {
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				return err
			}
		}
		return nil
	}
}

// newTestResolver returns a resolver for servers with a fake clock.
func newTestResolver(t testing.TB, cfg Config, clock *testenv.Clock, servers ...*testServer) *Resolver {
	t.Helper()
	for _, s := range servers {
		cfg.Servers = append(cfg.Servers, s.Addr)
	}
	if clock != nil {
		cfg.now = clock.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = testenv.Logger(t, nil)
	}
	if cfg.Timeout == 0 {
		// Generous for a loaded machine, short enough for tests of timeouts.
		cfg.Timeout = time.Second
	}
	r, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return r
}

// kindOf returns the name of err's kind, for messages.
func kindOf(err error) string {
	for _, k := range []error{ErrInvalidValue, ErrNoSuchName, ErrNoEndpoints, ErrTimeout, ErrRefused, ErrServerFailure, ErrMalformed} {
		if errors.Is(err, k) {
			return k.Error()
		}
	}
	return "none"
}
