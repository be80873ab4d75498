package docker

import (
	"testing"

	"github.com/connectable/connectable/internal/testenv"
	dockerapi "github.com/fsouza/go-dockerclient"
)

// TestRealEventStreamLost cuts the real client's connection to the engine:
// the library gives up and closes the listener, the watcher says so, keeps
// retrying, and once the engine is back resubscribes and catches up on what
// it missed.
func TestRealEventStreamLost(t *testing.T) {
	testenv.CheckGoroutines(t)
	img := sleeper(t)
	r := testenv.NewRelay(t, "/var/run/docker.sock")
	client, err := dockerapi.NewClient("unix://" + r.Path)
	if err != nil {
		t.Fatal(err)
	}
	w, sink, logs := realWatcher(t, Config{Client: client})
	a := run(t, append([]string{"--label", "connect.6000=" + sink.svc("a")}, img...)...)
	sink.waitApplied(t, a, map[uint16]string{6000: sink.svc("a")})

	r.Down()
	waitFor(t, "unhealthy", func() bool { return !w.Healthy() }, sink)
	waitFor(t, "loss logged", func() bool { return len(logs.Lines("WARN", "docker event stream lost")) == 1 }, sink)
	// Missed while down: b starts, a stops.
	b := run(t, append([]string{"--label", "connect.6001=" + sink.svc("b")}, img...)...)
	testenv.Run(t, "docker", "stop", "-t", "0", a)

	r.Up()
	sink.waitApplied(t, b, map[uint16]string{6001: sink.svc("b")})
	sink.waitRemoved(t, a)
	waitFor(t, "healthy again", w.Healthy, sink)
	if n := len(logs.Lines("docker event stream back")); n != 1 {
		t.Errorf("recovery logged %d times; want once", n)
	}
	// Events flow again (resync is 30s away).
	c := run(t, append([]string{"--label", "connect.6002=" + sink.svc("c")}, img...)...)
	sink.waitApplied(t, c, map[uint16]string{6002: sink.svc("c")})
}
