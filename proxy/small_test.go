package proxy

import (
	"github.com/connectable/connectable/internal/testenv"
	"io"
	"net"
	"testing"
	"time"
)

// BenchmarkRequestResponse measures the path small.go exists for: one
// connection carrying small request/response exchanges (HTTP keep-alive,
// Redis, SQL), 128 bytes each way per round trip. Each exchange is a read
// and a write per direction through a pooled buffer, never a splice pipe.
//
//	go test -run '^$' -bench RequestResponse -benchmem ./proxy/
func BenchmarkRequestResponse(b *testing.B) {
	const size = 128
	for _, proxied := range []bool{false, true} {
		b.Run(mode(proxied), func(b *testing.B) {
			be := testenv.StartBackend(b, func(c *net.TCPConn) {
				buf := make([]byte, size)
				for {
					if _, err := io.ReadFull(c, buf); err != nil {
						return
					}
					if _, err := c.Write(buf); err != nil {
						return
					}
				}
			})
			addr := be.Addr
			if proxied {
				_, addr = benchServer(b, be.Addr)
			}
			c := benchDial(b, addr, proxied)
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Minute))
			msg := make([]byte, size)
			b.SetBytes(2 * size)
			b.ResetTimer()
			start := time.Now()
			for b.Loop() {
				if _, err := c.Write(msg); err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(c, msg); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "round-trips/s")
		})
	}
}
