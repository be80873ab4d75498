package e2e

import (
	"fmt"
	"sort"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
)

// TestSetupLatency measures the time from `docker run` returning to the
// first request that reaches a backend through localhost inside the new
// container. The container's own command retries every 2 ms, so the figure
// is connectable's set-up time, not the test's polling. The bound asserted
// is loose (a slow shared machine must pass); the figures go to the log and
// the benchmark reports them.
func TestSetupLatency(t *testing.T) {
	prerequisites(t)
	be := startBackend(t, "be")
	srvs, hosts := service("web.service.test", be)
	startDaemon(t, testenv.Dnsmasq(t, srvs, hosts))
	image := testenv.BusyboxImage(t)

	const n = 10
	var lat []time.Duration
	for i := 0; i < n; i++ {
		path := fmt.Sprintf("/ready-%d", i)
		script := fmt.Sprintf("until wget -q -O /dev/null http://localhost:6000%s; do usleep 2000; done; exec sleep 3600", path)
		testenv.RunContainer(t, "-l", "connect.6000=web.service.test", image, "sh", "-c", script)
		started := time.Now()
		eventually(t, 20*time.Second, "first request of "+path, func() error {
			if _, ok := be.firstHit(path); !ok {
				return fmt.Errorf("no request yet")
			}
			return nil
		})
		at, _ := be.firstHit(path)
		lat = append(lat, at.Sub(started))
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	t.Logf("set-up latency over %d containers: median %v, worst %v, best %v",
		n, lat[n/2].Round(time.Millisecond), lat[n-1].Round(time.Millisecond), lat[0].Round(time.Millisecond))
}
