package docker

import (
	"errors"
	"maps"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
	"github.com/connectable/connectable/netns"
)

// These tests run the watcher against the machine's real Docker Engine.
// Other tests share it, so each sink records only the containers its own
// test started.

// realWatcher starts a watcher on the real engine with a sink that records
// only keys added with sink.watch.
func realWatcher(t *testing.T, cfg Config) (*Watcher, *recordingSink, *testenv.SyncBuffer) {
	t.Helper()
	testenv.NeedDocker(t)
	if cfg.Client == nil {
		client, err := NewClient("")
		if err != nil {
			t.Fatalf("NewClient: %v", err)
		}
		cfg.Client = client
	}
	sink := newRecordingSink()
	sink.tag = testenv.RandomName("t")
	logger, logs := newLogger(t)
	cfg.Sink, cfg.Logger = sink.via(t, logger), logger
	w := NewWatcher(cfg)
	startWatcher(t, w)
	waitFor(t, "healthy", w.Healthy, sink)
	return w, sink, logs
}

// run starts a container of the test (see testenv.RunContainer) with labels
// given as k=v, then args, and returns its ID.
func run(t *testing.T, args ...string) string {
	t.Helper()
	return testenv.RunContainer(t, args...)
}

func sleeper(t *testing.T) []string {
	// sleep as PID 1 ignores SIGTERM: tests stop with -t 0.
	return []string{testenv.BusyboxImage(t), "sleep", "600"}
}

func docker(t *testing.T, args ...string) string {
	t.Helper()
	return strings.TrimSpace(testenv.Run(t, "docker", args...))
}

func pidOf(t *testing.T, id string) int {
	t.Helper()
	pid, err := strconv.Atoi(docker(t, "inspect", "-f", "{{.State.Pid}}", id))
	if err != nil {
		t.Fatalf("pid of %s: %v", short(id), err)
	}
	return pid
}

// wantNetns checks that the namespace a Sink was given is a handle's name
// and enters the namespace of process pid.
func wantNetns(t *testing.T, got string, pid int) {
	t.Helper()
	if !netns.IsHandle(got) {
		t.Errorf("netns = %q; want a handle's name", got)
		return
	}
	want := pathInode(netnsPath(pid))
	var in uint64
	err := netns.Do(got, func() error { in = pathInode("/proc/thread-self/ns/net"); return nil })
	if err != nil || in != want {
		t.Errorf("netns %s enters namespace %d (err %v); want process %d's, %d", got, in, err, pid, want)
	}
}

func nameOf(t *testing.T, id string) string {
	t.Helper()
	return strings.TrimPrefix(docker(t, "inspect", "-f", "{{.Name}}", id), "/")
}

func TestRealContainerStartedBeforeRun(t *testing.T) {
	testenv.CheckGoroutines(t)
	testenv.NeedDocker(t)
	img := sleeper(t)
	id := run(t, append([]string{"--label", "connect.6000=redis.service.consul", "--label", "connect.6001=db"}, img...)...)

	w, sink, _ := func() (*Watcher, *recordingSink, *testenv.SyncBuffer) {
		// Watch before Run, so the initial list's Apply is recorded.
		testenv.NeedDocker(t)
		client, err := NewClient("")
		if err != nil {
			t.Fatalf("NewClient: %v", err)
		}
		sink := newRecordingSink()
		sink.watch(id)
		logger, logs := newLogger(t)
		w := NewWatcher(Config{Client: client, Sink: sink.via(t, logger), Logger: logger})
		startWatcher(t, w)
		return w, sink, logs
	}()
	routes := map[uint16]string{6000: "redis.service.consul", 6001: "db"}
	got := sink.waitApplied(t, id, routes)
	wantNetns(t, got.netns, pidOf(t, id))

	// Namespaces reflects it, with the other engine users' namespaces
	// around it.
	i := slices.IndexFunc(w.Namespaces(), func(n Namespace) bool { return n.Key == id })
	if i < 0 {
		t.Fatalf("Namespaces() lacks %s: %+v", short(id), w.Namespaces())
	}
	n := w.Namespaces()[i]
	wantMembers := []Container{{ID: short(id), Name: nameOf(t, id)}}
	if st, _ := sink.status(id); n.NetNS == nil || n.NetNS.Name() != got.netns || !maps.Equal(n.Routes, routes) || !slices.Equal(n.Containers, wantMembers) || st.Err != "" {
		t.Errorf("Namespaces()[%d] = %+v; want path %s, routes %v, containers %v", i, n, got.netns, routes, wantMembers)
	}

	docker(t, "stop", "-t", "0", id)
	sink.waitRemoved(t, id)
	if slices.ContainsFunc(w.Namespaces(), func(n Namespace) bool { return n.Key == id }) {
		t.Errorf("Namespaces() still lists %s after it stopped", short(id))
	}
}

func TestRealContainerStartedAfterRunThenRemoved(t *testing.T) {
	testenv.CheckGoroutines(t)
	img := sleeper(t)
	_, sink, _ := realWatcher(t, Config{})
	id := run(t, append([]string{"--label", "connect.6000=" + sink.svc("svc")}, img...)...)
	sink.waitApplied(t, id, map[uint16]string{6000: sink.svc("svc")})
	docker(t, "rm", "-f", id)
	sink.waitRemoved(t, id)
}

func TestRealSharedNamespace(t *testing.T) {
	testenv.CheckGoroutines(t)
	img := sleeper(t)
	_, sink, logs := realWatcher(t, Config{})

	a, b, c := sink.svc("a"), sink.svc("b"), sink.svc("c")
	owner := run(t, append([]string{"--label", "connect.7000=" + a}, img...)...)
	sink.waitApplied(t, owner, map[uint16]string{7000: a})
	member := run(t, append([]string{"--network", "container:" + owner,
		"--label", "connect.7001=" + b, "--label", "connect.7000=" + c}, img...)...)
	got := sink.waitApplied(t, owner, map[uint16]string{7000: a, 7001: b})
	wantNetns(t, got.netns, pidOf(t, owner))
	memberName := nameOf(t, member)
	waitFor(t, "conflict warning", func() bool {
		return len(logs.Lines("WARN", "container="+memberName, "label=connect.7000", "claimed_by=")) == 1
	}, sink)

	// The owner restarts into a new namespace; the member stays in the
	// old one, alone, where its labels (no longer disputed) still apply.
	docker(t, "restart", "-t", "0", owner)
	got = sink.waitApplied(t, owner, map[uint16]string{7000: a})
	wantNetns(t, got.netns, pidOf(t, owner))
	got = sink.waitApplied(t, member, map[uint16]string{7000: c, 7001: b})
	wantNetns(t, got.netns, pidOf(t, member))

	docker(t, "rm", "-f", member)
	sink.waitRemoved(t, member)
	if st, ok := sink.current(owner); !ok || !maps.Equal(st.routes, map[uint16]string{7000: a}) {
		t.Errorf("owner's state after the member left: %v, %v", st, ok)
	}
}

func TestRealHostNetworkSkipped(t *testing.T) {
	testenv.CheckGoroutines(t)
	img := sleeper(t)
	_, sink, logs := realWatcher(t, Config{})

	host := run(t, append([]string{"--network", "host", "--label", "connect.6000=" + sink.svc("svc")}, img...)...)
	name := nameOf(t, host)
	waitFor(t, "host mode warning", func() bool {
		return len(logs.Lines("WARN", "host network mode", "container="+name)) > 0
	}, sink)
	// Joining it puts a container in the host's namespace too.
	joined := run(t, append([]string{"--network", "container:" + host, "--label", "connect.6001=" + sink.svc("svc")}, img...)...)
	joinedName := nameOf(t, joined)
	waitFor(t, "joined host warning", func() bool {
		return len(logs.Lines("WARN", "host-mode", "container="+joinedName)) > 0
	}, sink)
	// A container started later is set up: events are handled in order,
	// so the host one was decided on before.
	marker := run(t, append([]string{"--label", "connect.6000=" + sink.svc("svc")}, img...)...)
	sink.waitApplied(t, marker, map[uint16]string{6000: sink.svc("svc")})
	for _, id := range []string{host, joined} {
		if calls := sink.callsFor(id); len(calls) != 0 {
			t.Errorf("sink calls for a container in the host's namespace: %v", calls)
		}
	}
	if n := len(logs.Lines("host network mode", "container="+name)); n != 1 {
		t.Errorf("warned %d times; want once:\n%s", n, logs)
	}
}

func TestRealNetworkNone(t *testing.T) {
	testenv.CheckGoroutines(t)
	img := sleeper(t)
	w, sink, _ := realWatcher(t, Config{})
	id := run(t, append([]string{"--network", "none", "--label", "connect.6000=" + sink.svc("svc")}, img...)...)
	got := sink.waitApplied(t, id, map[uint16]string{6000: sink.svc("svc")})
	wantNetns(t, got.netns, pidOf(t, id))
	if !slices.ContainsFunc(w.Namespaces(), func(n Namespace) bool { return n.Key == id }) {
		t.Errorf("Namespaces() lacks %s", short(id))
	}
}

func TestRealBadLabels(t *testing.T) {
	testenv.CheckGoroutines(t)
	img := sleeper(t)
	validate := func(v string) error {
		if strings.ContainsAny(v, "!") {
			return errors.New("not a DNS name")
		}
		return nil
	}
	_, sink, logs := realWatcher(t, Config{Validate: validate, ResyncInterval: 200 * time.Millisecond})
	bad := map[string]string{
		"connect.abc":   "x",
		"connect.70000": "y",
		"connect.0":     "z",
		"connect.6001":  "",
		"connect.6002":  "bad!name",
	}
	args := []string{"--label", "connect.6000=" + sink.svc("good")}
	for k, v := range bad {
		args = append(args, "--label", k+"="+v)
	}
	id := run(t, append(args, img...)...)
	sink.waitApplied(t, id, map[uint16]string{6000: sink.svc("good")})
	name := nameOf(t, id)
	// Several resyncs pass; each bad label is still logged once.
	time.Sleep(time.Second)
	for k := range bad {
		if n := len(logs.Lines("WARN", "container="+name, "label="+k+" ")); n != 1 {
			t.Errorf("label %s logged %d times; want once", k, n)
		}
	}
}

// TestNewClientHost: the host argument (the --docker-host flag) wins over
// DOCKER_HOST, which is used without it, on a real engine reached through a
// socket of the test's own.
func TestNewClientHost(t *testing.T) {
	testenv.NeedDocker(t)
	r := testenv.NewRelay(t, "/var/run/docker.sock")
	sock := "unix://" + r.Path
	t.Setenv("DOCKER_TLS_VERIFY", "")
	t.Setenv("DOCKER_HOST", "tcp://127.0.0.1:1") // nothing listens there
	c, err := NewClient(sock)
	if err != nil {
		t.Fatalf("NewClient(%q): %v", sock, err)
	}
	if err := c.Ping(); err != nil {
		t.Errorf("Ping through %s with DOCKER_HOST set elsewhere: %v", sock, err)
	}
	if c, err := NewClient(""); err != nil {
		t.Errorf("NewClient(\"\"): %v", err)
	} else if err := c.Ping(); err == nil {
		t.Errorf("NewClient(\"\") did not use DOCKER_HOST=tcp://127.0.0.1:1: Ping succeeded")
	}
	t.Setenv("DOCKER_HOST", sock)
	if c, err := NewClient(""); err != nil {
		t.Errorf("NewClient(\"\"): %v", err)
	} else if err := c.Ping(); err != nil {
		t.Errorf("Ping with DOCKER_HOST=%s: %v", sock, err)
	}
}
