package e2e

import (
	"testing"
	"time"
)

// TestChaosDNSDown stops the only DNS server (dnsmasq, killed by PID) and
// starts it again on the same port with the service moved to another
// backend. While it is down, the expired answer is served for --dns-stale
// (3 s here, after the 1 s TTL floor), then connections fail fast with a log
// line naming the service; once it is back, the fresh answer is used.
func TestChaosDNSDown(t *testing.T) {
	prerequisites(t)
	a, b := startBackend(t, "a"), startBackend(t, "b")
	srvsA, hostsA := service("web.service.test", a)
	srvsB, hostsB := service("web.service.test", b)
	dns := startDnsmasqAt(t, 0, srvsA, hostsA)
	const stale, ttl = 3 * time.Second, time.Second
	d := startDaemon(t, dns.Addr, "--dns-stale", stale.String(), "--dns-min-ttl", ttl.String(),
		"--dns-negative-ttl", "1s", "--dns-timeout", "500ms", "--connect-timeout", "500ms", "--dial-timeout", "2s")
	id := container(t, "-l", "connect.6000=web.service.test")
	ns := netnsOf(t, id)
	waitServed(t, ns, 6000, 30*time.Second)

	// Let the cached answer expire and refresh it, so the stale window
	// starts from a known point: the last fresh answer, just before the cut.
	time.Sleep(ttl + 100*time.Millisecond)
	if body, err := getIn(ns, "http://127.0.0.1:6000/"); err != nil || body != "a" {
		t.Fatalf("request before the cut: %q, %v", body, err)
	}
	refreshed := time.Now()
	dns.Stop()
	downAt := time.Now()

	var lastOK, firstFail time.Time
	var slowestFail time.Duration
	okDuringOutage, failed, okAfterFail := 0, 0, 0
	for time.Since(downAt) < ttl+stale+6*time.Second {
		start := time.Now()
		body, err := getIn(ns, "http://127.0.0.1:6000/")
		took := time.Since(start)
		switch {
		case err == nil && body == "a":
			okDuringOutage++
			lastOK = time.Now()
			if !firstFail.IsZero() {
				okAfterFail++
			}
		default:
			failed++
			if firstFail.IsZero() {
				firstFail = time.Now()
			}
			slowestFail = max(slowestFail, took)
		}
		if failed >= 10 {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("dns down: stale answers served for %v after the kill (%v after the last fresh answer; window: %v TTL floor + %v stale), %d requests served stale",
		lastOK.Sub(downAt).Round(time.Millisecond), lastOK.Sub(refreshed).Round(time.Millisecond), ttl, stale, okDuringOutage)
	if firstFail.IsZero() {
		t.Fatalf("requests never failed with DNS down for %v; stale answers must end after %v", time.Since(downAt), stale)
	}
	t.Logf("dns down: first failed request %v after the kill; slowest failure took %v; %d failures, %d successes after the first failure",
		firstFail.Sub(downAt).Round(time.Millisecond), slowestFail.Round(time.Millisecond), failed, okAfterFail)
	// Generous bounds: stale for most of its window, not long past it.
	if lastOK.Sub(refreshed) < stale-500*time.Millisecond {
		t.Errorf("stale answers stopped %v after the last fresh one; want about %v + %v", lastOK.Sub(refreshed), ttl, stale)
	}
	if firstFail.Sub(refreshed) > ttl+stale+3*time.Second {
		t.Errorf("requests kept succeeding %v after the last fresh answer; the stale window is %v + %v", firstFail.Sub(refreshed), ttl, stale)
	}
	if slowestFail > 3*time.Second {
		t.Errorf("a failing request took %v; want a fast failure (dial timeout 2s)", slowestFail)
	}
	if okAfterFail > 0 {
		t.Errorf("%d requests succeeded after the stale answer had run out, with DNS still down", okAfterFail)
	}
	logs := d.logs.String()
	if countLines(logs, "serving stale answer", "web.service.test") == 0 {
		t.Errorf("no log line says a stale answer is being served")
	}
	if countLines(logs, "no endpoint reachable", "web.service.test") == 0 {
		t.Errorf("no log line says why connections to web.service.test failed")
	}

	// DNS back, with the service moved to b.
	startDnsmasqAt(t, dns.Port, srvsB, hostsB)
	backAt := time.Now()
	eventually(t, 20*time.Second, "the fresh answer (backend b) used", func() error {
		body, err := getIn(ns, "http://127.0.0.1:6000/")
		if err == nil && body != "b" {
			return errString("served by " + body)
		}
		return err
	})
	t.Logf("dns back: fresh answer used %v after dnsmasq restarted", time.Since(backAt).Round(time.Millisecond))
	if countLines(d.logs.String(), "no endpoint reachable") > 0 {
		for _, line := range splitLines(logs) {
			if countLines(line, "no endpoint reachable") > 0 {
				t.Logf("failure log line: %s", line)
				break
			}
		}
	}
}

type errString string

func (e errString) Error() string { return string(e) }

func splitLines(s string) []string {
	var out []string
	start := 0
	for i := 0; i < len(s); i++ {
		if s[i] == '\n' {
			out = append(out, s[start:i])
			start = i + 1
		}
	}
	return append(out, s[start:])
}
