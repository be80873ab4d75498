package e2e

import (
	"bufio"
	"fmt"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
)

// TestChaosDockerUnreachable cuts the daemon's Docker socket (a relay in
// front of the real engine) for a few seconds. Meanwhile a long-lived
// connection through the proxy keeps exchanging data, new connections in a
// known namespace keep working, and a container is started. When the
// socket is back, the event stream and a resync must follow within 5 s and
// the new container must be set up.
func TestChaosDockerUnreachable(t *testing.T) {
	prerequisites(t)
	web := startBackend(t, "web")
	echoBe := testenv.StartBackend(t, testenv.Echo)
	srvs, hosts := service("web.service.test", web)
	s2, h2 := srvRecord("echo.service.test", "echo.node.test", echoBe.Port())
	srvs, hosts = merge(srvs, hosts, s2, h2)
	relay := testenv.NewRelay(t, "/var/run/docker.sock")
	d := startDaemon(t, testenv.Dnsmasq(t, srvs, hosts), "--docker-host", "unix://"+relay.Path)

	id := container(t, "-l", "connect.6000=web.service.test", "-l", "connect.7000=echo.service.test")
	ns := netnsOf(t, id)
	waitServed(t, ns, 6000, 30*time.Second)

	// The long-lived connection: a line every 20 ms, each echoed back.
	conn, err := dialIn(ns, "127.0.0.1:7000", 5*time.Second)
	if err != nil {
		t.Fatalf("long-lived connection: %v", err)
	}
	defer conn.Close()
	var exchanged atomic.Int64
	streamErr := make(chan error, 1)
	stop := make(chan struct{})
	go func() {
		r := bufio.NewReader(conn)
		for i := 0; ; i++ {
			select {
			case <-stop:
				streamErr <- nil
				return
			default:
			}
			line := fmt.Sprintf("line %d\n", i)
			conn.SetDeadline(time.Now().Add(10 * time.Second))
			if _, err := conn.Write([]byte(line)); err != nil {
				streamErr <- fmt.Errorf("write %d: %w", i, err)
				return
			}
			got, err := r.ReadString('\n')
			if err != nil || got != line {
				streamErr <- fmt.Errorf("line %d: got %q, %v", i, got, err)
				return
			}
			exchanged.Add(1)
			time.Sleep(20 * time.Millisecond)
		}
	}()
	eventually(t, 10*time.Second, "the stream flowing", func() error {
		if exchanged.Load() < 5 {
			return fmt.Errorf("%d lines", exchanged.Load())
		}
		return nil
	})
	page, _ := scrape(d.admin)
	resyncsBefore := metric(page, "connectable_docker_resyncs_total")

	// Cut.
	relay.Down()
	cutAt := time.Now()
	eventually(t, 20*time.Second, "healthz 503 with the socket cut", func() error {
		if code, _, err := get(d.admin, "/healthz"); err != nil || code != http.StatusServiceUnavailable {
			return fmt.Errorf("code %d, %v", code, err)
		}
		return nil
	})
	t.Logf("socket cut: /healthz 503 after %v", time.Since(cutAt).Round(time.Millisecond))
	atCut := exchanged.Load()
	newConns, failedConns := 0, 0
	late := container(t, "-l", "connect.6000=web.service.test")
	for time.Since(cutAt) < 6*time.Second {
		if body, err := getIn(ns, "http://127.0.0.1:6000/"); err != nil || body != "web" {
			failedConns++
			t.Errorf("new connection in a known namespace with Docker cut: %q, %v", body, err)
		} else {
			newConns++
		}
		time.Sleep(100 * time.Millisecond)
	}
	duringCut := exchanged.Load() - atCut
	cutFor := time.Since(cutAt)

	// Back.
	relay.Up()
	upAt := time.Now()
	var healthyAfter, resyncAfter time.Duration
	eventually(t, 20*time.Second, "healthz 200 and a resync after the socket is back", func() error {
		if healthyAfter == 0 {
			if code, _, err := get(d.admin, "/healthz"); err != nil || code != http.StatusOK {
				return fmt.Errorf("healthz %d, %v", code, err)
			}
			healthyAfter = time.Since(upAt)
		}
		page, err := scrape(d.admin)
		if err != nil {
			return err
		}
		if metric(page, "connectable_docker_resyncs_total") <= resyncsBefore || metric(page, "connectable_docker_stream_up") != 1 {
			return fmt.Errorf("no resync yet")
		}
		resyncAfter = time.Since(upAt)
		return nil
	})
	lateNS := netnsOf(t, late)
	start := time.Now()
	waitServed(t, lateNS, 6000, 20*time.Second)
	lateServed := time.Since(upAt)
	t.Logf("socket cut for %v: %d lines exchanged on the live connection during the cut (%d in all), %d new connections served, %d failed",
		cutFor.Round(time.Millisecond), duringCut, exchanged.Load(), newConns, failedConns)
	t.Logf("socket back: /healthz 200 after %v, resync done after %v (reconnects: %v), container started during the cut served %v after (%v of polling)",
		healthyAfter.Round(time.Millisecond), resyncAfter.Round(time.Millisecond),
		metric(func() string { p, _ := scrape(d.admin); return p }(), "connectable_docker_reconnects_total"),
		lateServed.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
	if resyncAfter > 5*time.Second {
		t.Errorf("resync %v after the socket came back; want within 5s", resyncAfter)
	}
	if duringCut < 20 {
		t.Errorf("only %d lines exchanged on the live connection during a %v cut", duringCut, cutFor)
	}

	close(stop)
	if err := <-streamErr; err != nil {
		t.Errorf("the live connection broke: %v (after %d lines)", err, exchanged.Load())
	}
	if !strings.Contains(d.logs.String(), "docker event stream back") {
		t.Errorf("no log line says the event stream is back")
	}
}
