package e2e

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
	"github.com/connectable/connectable/netns"
)

// startStreamBackend starts a loopback backend that writes to every client
// until the write fails, and reports each write's error on the channel.
func startStreamBackend(t *testing.T) (*testenv.Backend, <-chan error) {
	t.Helper()
	errs := make(chan error, 16)
	chunk := bytes.Repeat([]byte("stream "), 1<<13)
	be := testenv.StartBackend(t, func(c *net.TCPConn) {
		for {
			if _, err := c.Write(chunk); err != nil {
				select {
				case errs <- err:
				default:
				}
				return
			}
		}
	})
	return be, errs
}

// dialInContainer connects from inside a container's network namespace, as
// software in the container would: the socket is created there and stays.
func dialInContainer(t *testing.T, id, addr string) (net.Conn, error) {
	t.Helper()
	var c net.Conn
	err := netns.Do(fmt.Sprintf("/proc/%d/ns/net", pid(t, id)), func() (err error) {
		c, err = net.DialTimeout("tcp", addr, 10*time.Second)
		return err
	})
	return c, err
}

// TestDrainCutResets: a client inside a container reads a long stream
// through the real daemon, which gets SIGTERM with --drain-timeout 1s.
// When the drain time is over the daemon aborts the relay, and the client,
// which had read 650 KiB of a stream that had not ended, must see a reset:
// an EOF would pass the truncated stream off as complete. The daemon still
// exits 0.
func TestDrainCutResets(t *testing.T) {
	prerequisites(t)
	be, beErrs := startStreamBackend(t)
	dns := testenv.Dnsmasq(t,
		[]testenv.SRV{{Name: "stream.service.test", Target: "stream.node.test", Port: be.Port(), Priority: 1, Weight: 10}},
		map[string][]string{"stream.node.test": {"127.0.0.1"}})
	d := startDaemon(t, dns, "--drain-timeout", "1s")
	id := container(t, "-l", "connect.6000=stream.service.test")

	var c net.Conn
	eventually(t, 20*time.Second, "a stream through localhost:6000 in the container", func() error {
		var err error
		if c, err = dialInContainer(t, id, "127.0.0.1:6000"); err != nil {
			return err
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
			c.Close()
			return fmt.Errorf("reading the stream: %w", err)
		}
		return nil
	})
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(time.Minute))
	if _, err := io.CopyN(io.Discard, c, 650<<10); err != nil {
		t.Fatalf("reading the first 650 KiB: %v", err)
	}

	exited := make(chan int, 1)
	start := time.Now()
	go func() { exited <- d.stop(syscall.SIGTERM) }()
	n, err := io.Copy(io.Discard, c) // nil means EOF
	t.Logf("the stream ended %v after SIGTERM, %d bytes later: %v", time.Since(start).Round(time.Millisecond), n, err)
	// The stream must flow through the drain: it ends at the deadline,
	// not earlier (a lower bound, which a slow machine only helps meet).
	if d := time.Since(start); d < 900*time.Millisecond || n == 0 {
		t.Errorf("the stream ended %v after SIGTERM, %d bytes later; want it to flow until the 1s drain timeout", d, n)
	}
	if err == nil {
		t.Errorf("the cut stream ended with EOF; want a reset")
	} else if !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("the cut stream ended with %v; want a reset", err)
	}
	if code := <-exited; code != 0 {
		t.Errorf("exit code after SIGTERM = %d, want 0", code)
	}
	if !d.waitLog("drain timeout", time.Second) {
		t.Errorf("no log line about the drain timeout")
	}
	select {
	case err := <-beErrs:
		if !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.EPIPE) {
			t.Errorf("backend's write after the cut: %v; want a reset or broken pipe", err)
		}
	case <-time.After(10 * time.Second):
		t.Error("the backend's writes go on after the daemon exited")
	}
}
