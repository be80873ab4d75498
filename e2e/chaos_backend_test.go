package e2e

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
)

// TestChaosDeadEndpoints points services at endpoints that fail in two of
// the ways the issue names, with short bounds (--connect-timeout 500ms
// --dial-timeout 2s): every endpoint dead (one refusing, one black-holing
// SYNs) and an endpoint that resets mid-stream. Clients must see a prompt
// close, and the daemon's descriptors and goroutines must return to their
// baseline. The third way, an endpoint that never answers, is
// TestChaosSilentEndpoint.
func TestChaosDeadEndpoints(t *testing.T) {
	prerequisites(t)
	refused := closedPort(t)
	hole := testenv.Blackhole(t).Port()
	reset := testenv.StartBackend(t, func(c *net.TCPConn) {
		buf := make([]byte, 512)
		_, _ = c.Read(buf)
		_, _ = io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\npartial")
		time.Sleep(50 * time.Millisecond)
		c.SetLinger(0)
		c.Close()
	})
	hang := testenv.StartBackend(t, hold) // never answers
	ok := startBackend(t, "ok")

	srvs, hosts := service("ok.service.test", ok)
	for _, s := range []struct {
		name, target string
		port         uint16
	}{
		{"dead.service.test", "refused.node.test", refused},
		{"dead.service.test", "hole.node.test", hole},
		{"reset.service.test", "reset.node.test", reset.Port()},
		{"hang.service.test", "hang.node.test", hang.Port()},
	} {
		s2, h2 := srvRecord(s.name, s.target, s.port)
		srvs, hosts = merge(srvs, hosts, s2, h2)
	}
	d := startDaemon(t, startDnsmasqAt(t, 0, srvs, hosts).Addr, "--connect-timeout", "500ms", "--dial-timeout", "2s")
	id := container(t, "-l", "connect.6000=ok.service.test", "-l", "connect.6001=dead.service.test",
		"-l", "connect.6002=reset.service.test", "-l", "connect.6003=hang.service.test")
	ns := netnsOf(t, id)
	waitServed(t, ns, 6000, 30*time.Second)
	base := baseline(t, d)
	t.Logf("baseline: %v", base)

	const n = 20 // concurrent clients per kind, so a leak per connection shows
	type outcome struct {
		took time.Duration
		err  error // how the client's read ended
		got  int   // bytes read
	}
	run := func(port int, giveUp time.Duration) []outcome {
		out := make([]outcome, n)
		var wg sync.WaitGroup
		for i := range out {
			wg.Go(func() {
				start := time.Now()
				c, err := dialIn(ns, fmt.Sprintf("127.0.0.1:%d", port), 5*time.Second)
				if err != nil {
					out[i] = outcome{err: err}
					return
				}
				defer c.Close()
				_, _ = io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
				c.SetReadDeadline(time.Now().Add(giveUp))
				got, err := io.Copy(io.Discard, c)
				if err == nil {
					err = io.EOF
				}
				out[i] = outcome{took: time.Since(start), err: err, got: int(got)}
			})
		}
		wg.Wait()
		return out
	}
	summary := func(kind string, outs []outcome) (worst time.Duration, timeouts int) {
		kinds := map[string]int{}
		for _, o := range outs {
			worst = max(worst, o.took)
			var ne net.Error
			switch {
			case errors.As(o.err, &ne) && ne.Timeout():
				timeouts++
				kinds["client gave up"]++
			case errors.Is(o.err, syscall.ECONNRESET):
				kinds["reset"]++
			case errors.Is(o.err, io.EOF):
				kinds["closed"]++
			default:
				kinds[o.err.Error()]++
			}
		}
		t.Logf("%s: %d clients, slowest saw the end after %v: %v", kind, len(outs), worst.Round(time.Millisecond), kinds)
		return worst, timeouts
	}

	// Every endpoint dead: closed within the dial timeout.
	worst, timeouts := summary("all endpoints dead", run(6001, 10*time.Second))
	if timeouts > 0 || worst > 5*time.Second {
		t.Errorf("all endpoints dead: slowest close after %v, %d clients hung; want a close within the 2s dial timeout", worst, timeouts)
	}
	after := settle(t, d, base, 2, 30*time.Second, "after dead endpoints")
	t.Logf("after dead endpoints: %v", after)

	// Reset mid-stream: passed on at once, and as a reset, not a clean end
	// that would pass the truncated response off as complete.
	outs := run(6002, 10*time.Second)
	worst, timeouts = summary("endpoint resets mid-stream", outs)
	if timeouts > 0 || worst > 5*time.Second {
		t.Errorf("reset mid-stream: slowest close after %v, %d clients hung", worst, timeouts)
	}
	for _, o := range outs {
		if errors.Is(o.err, io.EOF) {
			t.Errorf("reset mid-stream reached the client as a clean end after %d bytes", o.got)
			break
		}
	}
	after = settle(t, d, base, 2, 30*time.Second, "after resets")
	t.Logf("after resets: %v", after)

	// The daemon still serves.
	if body, err := getIn(ns, "http://127.0.0.1:6000/"); err != nil || body != "ok" {
		t.Errorf("after the faults, localhost:6000 = %q, %v", body, err)
	}
}

// closedPort returns a loopback port nothing listens on.
func closedPort(t *testing.T) uint16 {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	return uint16(port)
}

// TestChaosSilentEndpoint points a service at an endpoint that accepts and
// then neither reads, writes nor closes (a hung process). connectable relays
// bytes, so the client sees what the backend does: nothing, until it gives
// up (after 1 s here) and closes its socket. From then on the daemon must
// hold nothing for that connection: no goroutine, no descriptor.
func TestChaosSilentEndpoint(t *testing.T) {
	prerequisites(t)
	hang := testenv.StartBackend(t, hold) // never answers
	ok := startBackend(t, "ok")
	srvs, hosts := service("ok.service.test", ok)
	s2, h2 := srvRecord("hang.service.test", "hang.node.test", hang.Port())
	srvs, hosts = merge(srvs, hosts, s2, h2)
	d := startDaemon(t, startDnsmasqAt(t, 0, srvs, hosts).Addr, "--connect-timeout", "500ms", "--dial-timeout", "2s",
		"--half-close-timeout", "5s")
	id := container(t, "-l", "connect.6000=ok.service.test", "-l", "connect.6003=hang.service.test")
	ns := netnsOf(t, id)
	waitServed(t, ns, 6000, 30*time.Second)
	base := baseline(t, d)
	t.Logf("baseline: %v", base)

	const n = 20
	var wg sync.WaitGroup
	var hung, other int64
	var mu sync.Mutex
	for range n {
		wg.Go(func() {
			c, err := dialIn(ns, "127.0.0.1:6003", 5*time.Second)
			if err != nil {
				t.Errorf("dial: %v", err)
				return
			}
			defer c.Close() // the client gives up
			_, _ = io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
			c.SetReadDeadline(time.Now().Add(time.Second))
			_, err = io.Copy(io.Discard, c)
			var ne net.Error
			mu.Lock()
			if errors.As(err, &ne) && ne.Timeout() {
				hung++
			} else {
				other++
			}
			mu.Unlock()
		})
	}
	wg.Wait()
	t.Logf("%d clients saw nothing for 1s and gave up, %d saw an end (backend accepted %d)", hung, other, hang.Accepted.Load())
	t.Logf("right after the clients gave up: %v", measure(t, d))
	after := settle(t, d, base, 2, 30*time.Second, "after the clients gave up on a silent endpoint")
	t.Logf("30s later at most: %v", after)
}
