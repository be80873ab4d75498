package resolver

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// fuzzName is the name every fuzzed lookup asks for; seeds answer it.
const fuzzName = "web.service.test."

// FuzzSRVReply drives resolveSRV, the code that turns a server's reply into
// endpoints, with hostile replies sent over real UDP and TCP sockets: the
// input is the packed reply to the SRV question, sent byte for byte with
// only its ID set to the query's. Follow-up A queries for targets missing
// from the additional section get a fixed valid answer, AAAA an empty one.
// Nothing may panic, the lookup must end within its bound, and whatever is
// returned must be dialable addresses.
func FuzzSRVReply(f *testing.F) {
	for _, seed := range srvReplySeeds(f) {
		f.Add(seed)
	}
	srv := startRawServer(f)
	f.Fuzz(func(t *testing.T, reply []byte) {
		if len(reply) > dns.MaxMsgSize {
			reply = reply[:dns.MaxMsgSize]
		}
		srv.reply.Store(&reply)
		r, err := New(Config{
			Servers: []string{srv.addr},
			// Replies the client discards (wrong question, garbage) end in
			// a timeout; a short one keeps the fuzzer's exec rate up.
			Timeout:  250 * time.Millisecond,
			StaleFor: -1,
			Logger:   slog.New(slog.NewTextHandler(io.Discard, nil)),
		})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		start := time.Now()
		ans, _, err := r.resolveSRV(ctx, fuzzName)
		if d := time.Since(start); d > 10*time.Second {
			t.Fatalf("resolveSRV took %v", d)
		}
		if testing.Verbose() {
			n := 0
			if ans != nil {
				n = ans.n
			}
			t.Logf("%d bytes: %d endpoints, err %v", len(reply), n, err)
		}
		if err != nil {
			if ans != nil {
				t.Fatalf("resolveSRV returned an answer with error %v", err)
			}
			return
		}
		eps := ans.endpoints()
		if len(eps) == 0 || len(eps) != ans.n {
			t.Fatalf("answer without error has %d endpoints (n = %d)", len(eps), ans.n)
		}
		for _, ep := range eps {
			if !ep.IsValid() || ep.Port() == 0 || ep.Addr().IsUnspecified() {
				t.Fatalf("undialable endpoint %v in %v", ep, eps)
			}
		}
	})
}

// rawServer answers SRV queries with the bytes in reply (ID patched), over
// UDP and TCP on one loopback port.
type rawServer struct {
	addr  string
	reply atomic.Pointer[[]byte]
}

func startRawServer(tb testing.TB) *rawServer {
	s := &rawServer{}
	empty := []byte{}
	s.reply.Store(&empty)
	var stop func()
	s.addr, stop = serveLoopback(tb, dns.HandlerFunc(s.serve))
	tb.Cleanup(stop)
	return s
}

func (s *rawServer) serve(w dns.ResponseWriter, req *dns.Msg) {
	if len(req.Question) != 1 {
		return
	}
	if q := req.Question[0]; q.Qtype != dns.TypeSRV {
		m := new(dns.Msg)
		m.SetReply(req)
		if q.Qtype == dns.TypeA {
			m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 5},
				A: net.IPv4(127, 0, 0, 9)})
		}
		_ = w.WriteMsg(m)
		return
	}
	raw := append([]byte(nil), *s.reply.Load()...)
	if len(raw) >= 2 {
		binary.BigEndian.PutUint16(raw, req.Id)
	}
	if _, udp := w.RemoteAddr().(*net.UDPAddr); udp && len(raw) > ednsSize {
		// What a real server does with a reply too big for the client's
		// buffer: the question alone, with TC set.
		m := new(dns.Msg)
		m.SetReply(req)
		m.Truncated = true
		_ = w.WriteMsg(m)
		return
	}
	_, _ = w.Write(raw)
}

// srvReplySeeds are replies to the SRV question for fuzzName: good ones,
// and the hostile shapes the issue names.
func srvReplySeeds(tb testing.TB) [][]byte {
	q := dns.Question{Name: fuzzName, Qtype: dns.TypeSRV, Qclass: dns.ClassINET}
	reply := func(build func(m *dns.Msg)) []byte {
		m := &dns.Msg{MsgHdr: dns.MsgHdr{Id: 1, Response: true, Authoritative: true}, Question: []dns.Question{q}, Compress: true}
		build(m)
		b, err := m.Pack()
		if err != nil {
			tb.Fatalf("packing seed: %v", err)
		}
		return b
	}
	hdr := func(name string, t uint16) dns.RR_Header {
		return dns.RR_Header{Name: name, Rrtype: t, Class: dns.ClassINET, Ttl: 30}
	}
	srvRR := func(target string, port, prio, weight uint16) dns.RR {
		return &dns.SRV{Hdr: hdr(fuzzName, dns.TypeSRV), Target: target, Port: port, Priority: prio, Weight: weight}
	}
	a := func(name string, ip net.IP) dns.RR { return &dns.A{Hdr: hdr(name, dns.TypeA), A: ip} }

	good := reply(func(m *dns.Msg) {
		m.Answer = []dns.RR{srvRR("a.node.test.", 8080, 1, 10), srvRR("b.node.test.", 8081, 1, 10), srvRR("c.node.test.", 8082, 2, 0)}
		m.Extra = []dns.RR{a("b.node.test.", net.IPv4(127, 0, 0, 2)), a("a.node.test.", net.IPv4(127, 0, 0, 1)),
			&dns.AAAA{Hdr: hdr("c.node.test.", dns.TypeAAAA), AAAA: net.ParseIP("::1")}}
	})
	seeds := [][]byte{
		good,
		// Glue missing: the targets are asked for with A/AAAA queries.
		reply(func(m *dns.Msg) {
			m.Answer = []dns.RR{srvRR("x.node.test.", 80, 0, 0), srvRR("y.node.test.", 81, 0, 5)}
		}),
		// Consul's shape: TXT next to A in the additional section.
		reply(func(m *dns.Msg) {
			m.Answer = []dns.RR{srvRR("7f000002.addr.dc1.consul.", 9000, 1, 1)}
			m.Extra = []dns.RR{a("7f000002.addr.dc1.consul.", net.IPv4(127, 0, 0, 2)),
				&dns.TXT{Hdr: hdr("7f000002.addr.dc1.consul.", dns.TypeTXT), Txt: []string{"consul-network-segment="}}}
		}),
		// Wrong types in the additional section, owners that match targets.
		reply(func(m *dns.Msg) {
			m.Answer = []dns.RR{srvRR("a.node.test.", 80, 1, 1)}
			m.Extra = []dns.RR{
				&dns.CNAME{Hdr: hdr("a.node.test.", dns.TypeCNAME), Target: "b.node.test."},
				&dns.MX{Hdr: hdr("a.node.test.", dns.TypeMX), Mx: "a.node.test.", Preference: 1},
				&dns.SRV{Hdr: hdr("a.node.test.", dns.TypeSRV), Target: "a.node.test.", Port: 1},
				&dns.TXT{Hdr: hdr("a.node.test.", dns.TypeTXT), Txt: []string{"1.2.3.4"}},
				a("a.node.test.", net.IPv4zero),
				&dns.AAAA{Hdr: hdr("a.node.test.", dns.TypeAAAA), AAAA: net.IPv6unspecified},
			}
		}),
		// SRV records in the additional section only, and an A in the answer.
		reply(func(m *dns.Msg) {
			m.Answer = []dns.RR{a(fuzzName, net.IPv4(127, 0, 0, 1))}
			m.Extra = []dns.RR{srvRR("a.node.test.", 80, 1, 1)}
		}),
		// Port 0 and target ".".
		reply(func(m *dns.Msg) { m.Answer = []dns.RR{srvRR(".", 80, 1, 1), srvRR("a.node.test.", 0, 1, 1)} }),
		// A CNAME loop in the answer.
		reply(func(m *dns.Msg) {
			m.Answer = []dns.RR{
				&dns.CNAME{Hdr: hdr(fuzzName, dns.TypeCNAME), Target: "loop.test."},
				&dns.CNAME{Hdr: hdr("loop.test.", dns.TypeCNAME), Target: fuzzName},
				&dns.SRV{Hdr: hdr("loop.test.", dns.TypeSRV), Target: "a.node.test.", Port: 80},
			}
		}),
		// Rcodes and flags.
		reply(func(m *dns.Msg) { m.Rcode = dns.RcodeNameError }),
		reply(func(m *dns.Msg) { m.Rcode = dns.RcodeServerFailure }),
		reply(func(m *dns.Msg) { m.Truncated = true; m.Answer = []dns.RR{srvRR("a.node.test.", 80, 1, 1)} }),
		reply(func(m *dns.Msg) { m.Response = false }),
		// A huge set: too big for UDP, so it comes again over TCP.
		reply(func(m *dns.Msg) {
			for i := range 1200 {
				target := fmt.Sprintf("n%d.node.test.", i)
				m.Answer = append(m.Answer, srvRR(target, uint16(1000+i), uint16(i%3), uint16(i%7)))
				m.Extra = append(m.Extra, a(target, net.IPv4(127, 0, byte(i>>8), byte(i))))
			}
		}),
		// Many targets, no glue: bounded parallel follow-up queries.
		reply(func(m *dns.Msg) {
			for i := range 200 {
				m.Answer = append(m.Answer, srvRR(fmt.Sprintf("g%d.node.test.", i), 80, 0, 0))
			}
		}),
	}
	// Wrong counts: the header promises more answers than there are, and
	// fewer additional records than follow.
	wrong := append([]byte(nil), good...)
	binary.BigEndian.PutUint16(wrong[6:], 200)
	seeds = append(seeds, wrong)
	wrong = append([]byte(nil), good...)
	binary.BigEndian.PutUint16(wrong[10:], 0)
	seeds = append(seeds, wrong)
	wrong = append([]byte(nil), good...)
	binary.BigEndian.PutUint16(wrong[4:], 3) // three questions, one present
	seeds = append(seeds, wrong)
	// Compression loops: the answer's owner name points at itself, and two
	// names point at each other. The question ends at offset 12+18+4 = 34.
	question := good[12:34]
	loop := func(body []byte) []byte {
		b := []byte{0, 1, 0x84, 0, 0, 1, 0, 1, 0, 0, 0, 0}
		b = append(b, question...)
		return append(b, body...)
	}
	srvTail := []byte{0, 33, 0, 1, 0, 0, 0, 30, 0, 8, 0, 1, 0, 1, 0, 80, 0xc0, 12}
	seeds = append(seeds,
		loop(append([]byte{0xc0, 34}, srvTail...)),                                          // owner → itself
		loop(append([]byte{1, 'a', 0xc0, 34}, srvTail...)),                                  // label then pointer back to itself
		loop(append([]byte{0xc0, 12}, srvTail[:16]...)),                                     // target pointer, rdata cut short
		loop([]byte{0xc0, 12, 0, 33, 0, 1, 0, 0, 0, 30, 0, 8, 0, 1, 0, 1, 0, 80, 0xc0, 52}), // target → itself
		loop([]byte{0xc0, 12, 0, 33, 0, 1, 0, 0, 0, 30, 0xff, 0xff}),                        // rdlength past the end
	)
	seeds = append(seeds, []byte{}, []byte{0}, good[:12], good[:len(good)-1])
	return seeds
}
