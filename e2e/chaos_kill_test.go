package e2e

import (
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
)

// TestChaosKillUnderLoad SIGKILLs the daemon while clients in two containers
// make requests, removes one container and starts another while it is
// dead, then starts it again: connections must work within 1 s of the new
// start, each rule must exist once, the removed container must have no
// state and the new one must be served.
func TestChaosKillUnderLoad(t *testing.T) {
	prerequisites(t)
	_, dns := webService(t)
	d := startDaemon(t, dns)
	a := container(t, "-l", "connect.6000=web.service.test", "-l", "connect.6001=web.service.test")
	b := container(t, "-l", "connect.6000=web.service.test")
	nsA, nsB := netnsOf(t, a), netnsOf(t, b)
	waitServed(t, nsA, 6000, 30*time.Second)
	waitServed(t, nsB, 6000, 30*time.Second)

	// Load: four clients in a loop until told to stop.
	var okN, failN atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i := range 4 {
		ns, port := nsA, 6000+i%2
		if i == 3 {
			ns, port = nsB, 6000
		}
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				if _, err := getIn(ns, fmt.Sprintf("http://127.0.0.1:%d/", port)); err != nil {
					failN.Add(1)
					time.Sleep(20 * time.Millisecond)
				} else {
					okN.Add(1)
				}
			}
		})
	}
	time.Sleep(2 * time.Second)
	beforeKill := okN.Load()
	d.stop(syscall.SIGKILL)
	killedAt := time.Now()
	close(stop)
	wg.Wait()
	t.Logf("load: %d requests served in the 2s before the kill, %d failed (all around the kill)", beforeKill, failN.Load())

	// While it is dead: one container goes, another comes.
	testenv.Run(t, "docker", "rm", "-f", b)
	c := container(t, "-l", "connect.6000=web.service.test")
	deadFor := time.Since(killedAt)

	d = startDaemon(t, dns)
	started := time.Now()
	var firstOK time.Duration
	for time.Since(started) < 20*time.Second {
		// A short dial first: until the new daemon listens, the restart
		// guard drops the SYN, and a plain request would wait out its
		// client's 1 s retransmit rather than show when serving resumed.
		if c, err := dialIn(nsA, "127.0.0.1:6000", 100*time.Millisecond); err == nil {
			c.Close()
			if _, err := getIn(nsA, "http://127.0.0.1:6000/"); err == nil {
				firstOK = time.Since(started)
				break
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	if firstOK == 0 {
		t.Fatalf("no request served within 20s of the new start")
	}
	t.Logf("daemon dead for %v; after the new start, connections work again after %v", deadFor.Round(time.Millisecond), firstOK.Round(time.Millisecond))
	if firstOK > time.Second {
		t.Errorf("connections work again %v after the new start; want within 1s", firstOK)
	}
	waitServed(t, netnsOf(t, c), 6000, 20*time.Second)

	rulesOnce(t, a, "6000", "6001")
	eventually(t, 10*time.Second, "/status: the removed container gone, the new one present", func() error {
		st := status(t, d)
		if findNamespace(st, b) != nil {
			return fmt.Errorf("container %.12s, removed while the daemon was dead, still in /status", b)
		}
		if findNamespace(st, c) == nil || findNamespace(st, a) == nil {
			return fmt.Errorf("containers %.12s or %.12s missing from /status", a, c)
		}
		return nil
	})
}
