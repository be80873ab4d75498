package proxy

import (
	"context"
	"github.com/connectable/connectable/internal/testenv"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"testing"
	"time"
)

// Benchmarks on loopback, each comparing the proxy with a direct connection
// to the same backend:
//
//	go test -run '^$' -bench . -benchmem ./proxy/
//
// Bulk throughput is meant to stay at or above 80% of direct; an idle
// relayed connection is meant to cost at most 9 KiB (the B/conn metric).

// benchServer starts a quiet server relaying port 6000 to be.
func benchServer(b *testing.B, be netip.AddrPort) (*Server, netip.AddrPort) {
	b.Helper()
	res := newResolver(false)
	res.set("svc", be)
	s := newServer(b, res, func(s *Server) { s.Logger = testLogger(b, slog.LevelWarn) })
	if err := s.Apply(context.Background(), "bench", "", map[uint16]string{6000: "svc"}); err != nil {
		b.Fatal(err)
	}
	return s, proxyAddr(b, s, "bench")
}

// benchDial connects to addr, through the proxy when proxied (as a client
// redirected from port 6000).
func benchDial(b *testing.B, addr netip.AddrPort, proxied bool) *net.TCPConn {
	d := net.Dialer{Timeout: 10 * time.Second}
	if proxied {
		d.LocalAddr = &net.TCPAddr{IP: net.IPv4(127, 1, 6000>>8, 6000&0xff)}
		d.Control = bindAddressNoPort
	}
	c, err := d.Dial("tcp4", addr.String())
	if err != nil {
		b.Fatal(err)
	}
	return c.(*net.TCPConn)
}

// BenchmarkConnect measures new connections per second: connect, receive
// one byte from the backend, close.
func BenchmarkConnect(b *testing.B) {
	for _, proxied := range []bool{false, true} {
		b.Run(mode(proxied), func(b *testing.B) {
			be := testenv.StartBackend(b, tagEcho('x'))
			addr := be.Addr
			if proxied {
				_, addr = benchServer(b, be.Addr)
			}
			var buf [1]byte
			b.ResetTimer()
			start := time.Now()
			for b.Loop() {
				c := benchDial(b, addr, proxied)
				if _, err := io.ReadFull(c, buf[:]); err != nil {
					b.Fatal(err)
				}
				c.Close()
			}
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "conns/s")
		})
	}
}

func mode(proxied bool) string {
	if proxied {
		return "proxy"
	}
	return "direct"
}

// sink reads everything with a large buffer, then answers one byte.
func sink(c *net.TCPConn) {
	buf := make([]byte, 256<<10)
	for {
		if _, err := c.Read(buf); err != nil {
			break
		}
	}
	c.Write([]byte{1})
}

// bulk sends n MiB over a new connection to addr and waits until the
// backend has read them all.
func bulk(b *testing.B, addr netip.AddrPort, proxied bool, chunk []byte, n int) {
	c := benchDial(b, addr, proxied)
	defer c.Close()
	for range n {
		if _, err := c.Write(chunk); err != nil {
			b.Fatal(err)
		}
	}
	c.CloseWrite()
	var ack [1]byte
	if _, err := io.ReadFull(c, ack[:]); err != nil {
		b.Fatalf("waiting for the backend to read everything: %v", err)
	}
}

// BenchmarkBulk measures one-way throughput over a single connection.
func BenchmarkBulk(b *testing.B) {
	chunk := make([]byte, 1<<20)
	for _, proxied := range []bool{false, true} {
		b.Run(mode(proxied), func(b *testing.B) {
			be := testenv.StartBackend(b, sink)
			addr := be.Addr
			if proxied {
				_, addr = benchServer(b, be.Addr)
			}
			b.SetBytes(int64(len(chunk)))
			b.ResetTimer()
			bulk(b, addr, proxied, chunk, b.N)
		})
	}
}

// BenchmarkBulkRatio alternates direct and proxied transfers of 256 MiB,
// so that both see the same load on a shared machine, and reports the
// proxy's throughput as a share of direct.
func BenchmarkBulkRatio(b *testing.B) {
	const mib = 256
	chunk := make([]byte, 1<<20)
	be := testenv.StartBackend(b, sink)
	_, paddr := benchServer(b, be.Addr)
	var direct, proxied time.Duration
	for b.Loop() {
		start := time.Now()
		bulk(b, be.Addr, false, chunk, mib)
		direct += time.Since(start)
		start = time.Now()
		bulk(b, paddr, true, chunk, mib)
		proxied += time.Since(start)
	}
	total := float64(b.N*mib) * (1 << 20) / 1e6
	b.ReportMetric(total/direct.Seconds(), "direct-MB/s")
	b.ReportMetric(total/proxied.Seconds(), "proxy-MB/s")
	b.ReportMetric(direct.Seconds()/proxied.Seconds(), "ratio")
}

// BenchmarkIdleConnMemory holds idleConns relayed connections that have
// carried one byte and now sit idle, and reports the Go heap and stack they
// cost. The test's own two ends of each connection are measured the same
// way with direct connections and subtracted: B/conn is what the proxy
// holds, gross-B/conn includes the test's ends.
//
// "down" connections carried a byte from the backend only (a server that
// speaks first, then silence); "both" carried a byte each way, so both copy
// goroutines sit in splice.
func BenchmarkIdleConnMemory(b *testing.B) {
	const idleConns = 2000
	for _, both := range []bool{false, true} {
		name := "down"
		if both {
			name = "both"
		}
		b.Run(name, func(b *testing.B) {
			for b.Loop() {
				direct, _ := idleCost(b, idleConns, false, both)
				gross, stack := idleCost(b, idleConns, true, both)
				b.ReportMetric(gross-direct, "B/conn")
				b.ReportMetric(stack, "stack-B/conn")
				b.ReportMetric(gross, "gross-B/conn")
				b.ReportMetric(direct, "direct-pair-B/conn")
			}
		})
	}
}

// idleCost opens n connections (proxied or direct) to a backend that sends
// one byte on accept (and reads one if both) and then holds them without a
// goroutine, and returns the growth of heap and stack memory per
// connection, and of stack alone.
func idleCost(b *testing.B, n int, proxied, both bool) (total, stack float64) {
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		b.Fatal(err)
	}
	var (
		mu      sync.Mutex
		held    []*net.TCPConn
		clients []*net.TCPConn
		wg      sync.WaitGroup
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			c.Write([]byte{'x'})
			if both {
				io.ReadFull(c, make([]byte, 1))
			}
			mu.Lock()
			held = append(held, c)
			mu.Unlock()
		}
	}()
	addr := ln.Addr().(*net.TCPAddr).AddrPort()
	var s *Server
	if proxied {
		res := newResolver(false)
		res.set("svc", addr)
		s = &Server{Resolver: res, AllowTargets: loopbackTargets, Listen: loopListen, OrigDst: loopOrigDst, Logger: testLogger(b, slog.LevelWarn)}
		if err := s.Apply(context.Background(), "bench", "", map[uint16]string{6000: "svc"}); err != nil {
			b.Fatal(err)
		}
		addr = proxyAddr(b, s, "bench")
	}
	clients = make([]*net.TCPConn, 0, n) // allocated before the first reading
	before, stackBefore := liveMemory()
	var one [1]byte
	for range n {
		c := benchDial(b, addr, proxied)
		if _, err := io.ReadFull(c, one[:]); err != nil {
			b.Fatal(err)
		}
		if both {
			c.Write(one[:])
		}
		clients = append(clients, c)
	}
	// The backend has read the last client's byte once it holds n.
	for {
		mu.Lock()
		k := len(held)
		mu.Unlock()
		if k == n {
			break
		}
		time.Sleep(time.Millisecond)
	}
	after, stackAfter := liveMemory()
	for _, c := range clients {
		c.Close()
	}
	ln.Close()
	wg.Wait()
	for _, c := range held {
		c.Close()
	}
	if s != nil {
		s.Close()
	}
	return float64(after-before) / float64(n), float64(stackAfter-stackBefore) / float64(n)
}

// liveMemory returns the bytes of live heap objects and goroutine stacks,
// and of stacks alone, after collections that let stacks shrink back to
// what they use.
func liveMemory() (total, stack uint64) {
	var ms runtime.MemStats
	for range 5 {
		runtime.GC()
	}
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc + ms.StackInuse, ms.StackInuse
}
