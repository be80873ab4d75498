package docker

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	dockerapi "github.com/fsouza/go-dockerclient"

	"github.com/connectable/connectable/internal/testenv"
)

// These tests inject, through a fake engine, what the real one cannot be made
// to do on demand. Everything else is tested on the real engine
// (watcher_test.go).

const never = time.Hour // resync interval of tests that must not rely on resync

func TestFaultEventDuringInitialList(t *testing.T) {
	testenv.CheckGoroutines(t)
	f := newFakeEngine()
	sink := newRecordingSink()
	sink.keys = nil
	a := f.add("early", "", map[string]string{"connect.6000": "a"})
	var b string
	// The list's snapshot is taken before b starts; only the event that
	// arrives while the list is still running tells of b.
	f.onList = func() {
		b = f.add("during-list", "", map[string]string{"connect.6001": "b"})
		f.emit("start", b)
	}
	w, _ := newFakeWatcher(t, f, sink, never)
	startWatcher(t, w)

	sink.waitApplied(t, a, map[uint16]string{6000: "a"})
	waitFor(t, "b known", func() bool { return b != "" }, sink)
	got := sink.waitApplied(t, b, map[uint16]string{6001: "b"})
	if want := netnsPath(f.pid(b)); got.netns != want {
		t.Errorf("netns = %q; want %q", got.netns, want)
	}
}

func TestFaultDroppedEventRecoveredByResync(t *testing.T) {
	testenv.CheckGoroutines(t)
	f := newFakeEngine()
	sink := newRecordingSink()
	sink.keys = nil
	w, _ := newFakeWatcher(t, f, sink, 50*time.Millisecond)
	startWatcher(t, w)
	waitFor(t, "healthy", w.Healthy, sink)

	id := f.add("silent", "", map[string]string{"connect.6000": "svc"}) // no event
	sink.waitApplied(t, id, map[uint16]string{6000: "svc"})
	f.remove(id) // no event either
	sink.waitRemoved(t, id)
}

func TestFaultInspectNoSuchContainerRemoves(t *testing.T) {
	testenv.CheckGoroutines(t)
	f := newFakeEngine()
	sink := newRecordingSink()
	sink.keys = nil
	id := f.add("doomed", "", map[string]string{"connect.6000": "svc"})
	w, _ := newFakeWatcher(t, f, sink, never)
	startWatcher(t, w)
	sink.waitApplied(t, id, map[uint16]string{6000: "svc"})

	f.remove(id)
	f.emit("destroy", id) // inspect now answers NoSuchContainer
	sink.waitRemoved(t, id)
	if ns := w.Namespaces(); len(ns) != 0 {
		t.Errorf("Namespaces() = %+v after removal; want none", ns)
	}
}

func TestFaultStreamClosedResubscribes(t *testing.T) {
	testenv.CheckGoroutines(t)
	f := newFakeEngine()
	sink := newRecordingSink()
	sink.keys = nil
	a := f.add("before", "", map[string]string{"connect.6000": "a"})
	w, logs := newFakeWatcher(t, f, sink, never)
	startWatcher(t, w)
	sink.waitApplied(t, a, map[uint16]string{6000: "a"})
	waitFor(t, "healthy", w.Healthy, sink)

	// The engine goes away: the library closes the listener and later
	// subscriptions fail until it is back.
	f.setDown(true)
	f.endStream()
	waitFor(t, "unhealthy", func() bool { return !w.Healthy() }, sink)
	subs := f.subscriptions()
	waitFor(t, "retries", func() bool { return f.subscriptions() >= subs+2 }, sink)
	if w.Healthy() {
		t.Errorf("Healthy() = true while the engine is down")
	}

	// Meanwhile a container started and a's went away: nobody will ever
	// send those events.
	b := f.add("while-down", "", map[string]string{"connect.6001": "b"})
	f.remove(a)
	f.setDown(false)
	sink.waitApplied(t, b, map[uint16]string{6001: "b"})
	sink.waitRemoved(t, a)
	waitFor(t, "healthy again", w.Healthy, sink)
	if st := w.Stats(); st.Reconnects < 1 || st.Resyncs < 2 {
		t.Errorf("Stats() = %+v after a reconnection; want Reconnects ≥ 1 and Resyncs ≥ 2", st)
	}

	if n := len(logs.Lines("docker event stream lost")); n != 1 {
		t.Errorf("logged the loss %d times; want once:\n%s", n, logs)
	}
	if n := len(logs.Lines("docker event stream back")); n != 1 {
		t.Errorf("logged the recovery %d times; want once:\n%s", n, logs)
	}

	// And the new subscription delivers events.
	c := f.add("after", "", map[string]string{"connect.6002": "c"})
	f.emit("start", c)
	sink.waitApplied(t, c, map[uint16]string{6002: "c"})
}

func TestFaultEngineDownAtStart(t *testing.T) {
	testenv.CheckGoroutines(t)
	f := newFakeEngine()
	f.setDown(true)
	sink := newRecordingSink()
	sink.keys = nil
	a := f.add("waiting", "", map[string]string{"connect.6000": "a"})
	w, logs := newFakeWatcher(t, f, sink, never)
	startWatcher(t, w)
	waitFor(t, "retries", func() bool { return f.subscriptions() >= 3 }, sink)
	if w.Healthy() {
		t.Errorf("Healthy() = true before the engine answered")
	}
	f.setDown(false)
	sink.waitApplied(t, a, map[uint16]string{6000: "a"})
	waitFor(t, "healthy", w.Healthy, sink)
	if n := len(logs.Lines("docker engine unreachable")); n != 1 {
		t.Errorf("logged unreachability %d times; want once:\n%s", n, logs)
	}
}

func TestFaultSlowSinkDoesNotBlockOthers(t *testing.T) {
	testenv.CheckGoroutines(t)
	f := newFakeEngine()
	sink := newRecordingSink()
	sink.keys = nil
	slow := f.add("slow", "", map[string]string{"connect.6000": "slow"})
	release := make(chan struct{})
	var slowCalls atomic.Int32
	sink.block = func(c call) <-chan struct{} {
		if c.key == slow {
			slowCalls.Add(1)
			return release
		}
		return nil
	}
	w, _ := newFakeWatcher(t, f, sink, never)
	startWatcher(t, w)
	waitFor(t, "slow apply started", func() bool { return slowCalls.Load() == 1 }, sink)

	// While slow's Apply hangs, another container is set up, and slow's
	// state changes three times: it gets one more call, with the last.
	fast := f.add("fast", "", map[string]string{"connect.6000": "fast"})
	f.emit("start", fast)
	sink.waitApplied(t, fast, map[uint16]string{6000: "fast"})
	for _, svc := range []string{"x", "y", "z"} {
		m := f.add("member-"+svc, "container:"+slow, map[string]string{"connect.7000": svc})
		f.emit("start", m)
		waitFor(t, "member seen", func() bool {
			ns := w.Namespaces()
			for _, n := range ns {
				if n.Key == slow && len(n.Containers) > 1 {
					return true
				}
			}
			return false
		}, sink)
		f.remove(m)
		f.emit("destroy", m)
	}
	final := f.add("member-final", "container:"+slow, map[string]string{"connect.7001": "final"})
	f.emit("start", final)
	waitFor(t, "final member seen", func() bool {
		for _, n := range w.Namespaces() {
			if n.Key == slow && maps.Equal(n.Routes, map[uint16]string{6000: "slow", 7001: "final"}) {
				return true
			}
		}
		return false
	}, sink)
	close(release)
	sink.waitApplied(t, slow, map[uint16]string{6000: "slow", 7001: "final"})
	if n := slowCalls.Load(); n != 2 {
		t.Errorf("slow key got %d calls; want 2 (the first, then the latest state):\n%v", n, sink)
	}
}

// TestFaultFailedApplyRetried: the reconciler retries a failed set-up by
// itself, with back-off, and shows the error until one succeeds. The resync
// interval is too long to explain the retries.
func TestFaultFailedApplyRetried(t *testing.T) {
	testenv.CheckGoroutines(t)
	f := newFakeEngine()
	sink := newRecordingSink()
	sink.keys = nil
	var failures atomic.Int32
	failures.Store(2)
	sink.fail = func(c call) error {
		if failures.Add(-1) >= 0 {
			return errors.New("injected failure")
		}
		return nil
	}
	id := f.add("flaky", "", map[string]string{"connect.6000": "svc"})
	w, logs := newFakeWatcher(t, f, sink, never)
	startWatcher(t, w)
	waitFor(t, "an error shown", func() bool {
		st, ok := sink.status(id)
		return ok && strings.Contains(st.Err, "injected failure") && !st.Applied
	}, sink)
	sink.waitApplied(t, id, map[uint16]string{6000: "svc"})
	waitFor(t, "error cleared", func() bool {
		st, ok := sink.status(id)
		return ok && st.Err == "" && st.Applied
	}, sink)
	if n := len(sink.callsFor(id)); n != 3 {
		t.Errorf("got %d calls; want 3 (two failures, one success):\n%v", n, sink)
	}
	if len(logs.Lines("setting up namespace", "injected failure")) == 0 {
		t.Errorf("failure not logged:\n%s", logs)
	}
}

// TestFaultSlowResyncDoesNotStallEvents: a periodic resync whose
// inspections hang (an engine stuck on some containers) runs beside event
// handling, which goes on; the resync's inspections run several at once.
func TestFaultSlowResyncDoesNotStallEvents(t *testing.T) {
	testenv.CheckGoroutines(t)
	f := newFakeEngine()
	sink := newRecordingSink()
	sink.keys = nil
	var stuck []string
	for i := range 3 {
		stuck = append(stuck, f.add(fmt.Sprintf("stuck-%d", i), "", map[string]string{"connect.6000": "stuck"}))
	}
	release := make(chan struct{})
	var holding atomic.Int32
	var resyncing atomic.Bool
	f.onInspect = func(opts dockerapi.InspectContainerOptions) {
		if resyncing.Load() && slices.Contains(stuck, opts.ID) {
			holding.Add(1)
			select {
			case <-release:
			case <-opts.Context.Done():
			}
		}
	}
	w, _ := newFakeWatcher(t, f, sink, 50*time.Millisecond)
	t.Cleanup(func() { close(release) }) // before the watcher's own cleanup
	startWatcher(t, w)
	for _, id := range stuck {
		sink.waitApplied(t, id, map[uint16]string{6000: "stuck"})
	}
	resyncing.Store(true)
	waitFor(t, "the resync's inspections all hanging at once", func() bool { return holding.Load() == 3 }, sink)

	id := f.add("during-resync", "", map[string]string{"connect.6001": "new"})
	f.emit("start", id)
	sink.waitApplied(t, id, map[uint16]string{6001: "new"})
	f.remove(id)
	f.emit("destroy", id)
	sink.waitRemoved(t, id)
	for _, id := range stuck {
		if _, ok := sink.current(id); !ok {
			t.Errorf("%s removed while its inspection hung", short(id))
		}
	}
}

func TestFaultSkips(t *testing.T) {
	testenv.CheckGoroutines(t)
	f := newFakeEngine()
	sink := newRecordingSink()
	sink.keys = nil
	self := f.add("connectable", "", map[string]string{"connect.6000": "self"})
	joined := f.add("joined-self", "container:"+self, map[string]string{"connect.6001": "joined"})
	zero := f.add("pid-zero", "", map[string]string{"connect.6002": "zero"})
	f.world[zero].State.Pid = 0
	stopped := f.add("stopped", "", map[string]string{"connect.6003": "stopped"})
	f.world[stopped].State.Running = false
	host := f.add("hosty", "host", map[string]string{"connect.6004": "host"})
	ok := f.add("fine", "", map[string]string{"connect.6005": "fine"})

	hostns := f.add("in-host-netns", "", map[string]string{"connect.6006": "hostns"})
	f.setNetns(hostns, 1)
	joinedHost := f.add("joined-host", "container:"+host, map[string]string{"connect.6007": "joined-host"})

	logger, logs := newLogger(t)
	w := newWatcher(Config{Sink: sink.via(t, logger), ResyncInterval: 50 * time.Millisecond, Logger: logger, SelfID: self[:12]}, f)
	w.nsInode, w.forbidden = f.inode, map[uint64]bool{1: true}
	w.openNS = noNamespace
	startWatcher(t, w)
	sink.waitApplied(t, ok, map[uint16]string{6005: "fine"})
	// Let a few resyncs pass: still nothing else, and no repeated warnings.
	time.Sleep(300 * time.Millisecond)
	for _, id := range []string{self, joined, zero, stopped, host, hostns, joinedHost} {
		if calls := sink.callsFor(id); len(calls) != 0 {
			t.Errorf("calls for a skipped container: %v", calls)
		}
	}
	if n := len(logs.Lines("host network mode", "container=hosty")); n != 1 {
		t.Errorf("host mode warned %d times; want once:\n%s", n, logs)
	}
	for _, name := range []string{"joined-host", "in-host-netns"} {
		if n := len(logs.Lines("WARN", "container="+name)); n != 1 {
			t.Errorf("%s warned %d times; want once:\n%s", name, n, logs)
		}
	}
	if n := len(logs.Lines("WARN", "pid-zero")) + len(logs.Lines("WARN", "stopped")); n != 0 {
		t.Errorf("warned about a container without a process:\n%s", logs)
	}
	ns := w.Namespaces()
	if len(ns) != 1 || ns[0].Key != ok {
		t.Errorf("Namespaces() = %+v; want only %s", ns, short(ok))
	}
}

// TestFaultOwnerRestart: a container that joined another's namespace stays in
// it when that owner restarts into a new one (checked on the real engine in
// TestRealSharedNamespace); it then keys its namespace itself.
func TestFaultOwnerRestart(t *testing.T) {
	testenv.CheckGoroutines(t)
	f := newFakeEngine()
	sink := newRecordingSink()
	sink.keys = nil
	owner := f.add("owner", "", map[string]string{"connect.7000": "a"})
	member := f.add("member", "container:"+owner, map[string]string{"connect.7001": "b"})
	f.setNetns(owner, 10)
	f.setNetns(member, 10)
	w, _ := newFakeWatcher(t, f, sink, never)
	startWatcher(t, w)
	got := sink.waitApplied(t, owner, map[uint16]string{7000: "a", 7001: "b"})
	if want := netnsPath(f.pid(owner)); got.netns != want {
		t.Errorf("netns = %q; want the owner's %q", got.netns, want)
	}

	f.emit("die", owner)
	f.restart(owner)
	f.setNetns(owner, 11)
	f.emit("start", owner)
	sink.waitApplied(t, owner, map[uint16]string{7000: "a"})
	got = sink.waitApplied(t, member, map[uint16]string{7001: "b"})
	if want := netnsPath(f.pid(member)); got.netns != want {
		t.Errorf("netns = %q; want the member's own %q", got.netns, want)
	}
	if n := len(w.Namespaces()); n != 2 {
		t.Errorf("Namespaces() = %+v; want two", w.Namespaces())
	}
}
