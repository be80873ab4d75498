package docker

import (
	"maps"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	dockerapi "github.com/fsouza/go-dockerclient"

	"github.com/connectable/connectable/internal/testenv"
)

// Podman's Docker-compatible API, as measured on podman 4.3.1 (Debian 12),
// differs from Docker's in its events: it matches the "event" filter
// against its own names, so a subscription to "die" never sees a container
// die (its name is "died"), yet the event it then sends says "die"; and a
// removed container sends "remove", never "destroy". A stop sends "die" and
// "cleanup" (twice), no "stop"; `rm -f` of a running container sends "die",
// "cleanup" and "remove". The events carry the container's labels among
// their attributes, as Docker's do. The end-to-end suite runs the same
// cases against a real podman (e2e/podman_test.go); these tests pin the
// semantics down without one.

// podmanEngine is the fake engine with podman's event filtering.
type podmanEngine struct {
	*fakeEngine

	mu     sync.Mutex
	events []string // the "event" filter of the last subscription
}

func newPodmanEngine() *podmanEngine { return &podmanEngine{fakeEngine: newFakeEngine()} }

func (p *podmanEngine) AddEventListenerWithOptions(opts dockerapi.EventsOptions, l chan<- *dockerapi.APIEvents) error {
	p.mu.Lock()
	p.events = slices.Clone(opts.Filters["event"])
	p.mu.Unlock()
	return p.fakeEngine.AddEventListenerWithOptions(opts, l)
}

// send emits the event podman names status about id, if the subscription's
// filter lets it through, as podman's compatibility layer renders it.
func (p *podmanEngine) send(status, id string) {
	p.mu.Lock()
	pass := len(p.events) == 0 || slices.Contains(p.events, status)
	p.mu.Unlock()
	if !pass {
		return
	}
	action := status
	if status == "died" {
		action = "die"
	}
	f := p.fakeEngine
	f.mu.Lock()
	defer f.mu.Unlock()
	attrs := map[string]string{"containerExitCode": "0", "image": "localhost/test:latest", "podId": ""}
	if c := f.world[id]; c != nil {
		maps.Copy(attrs, c.Config.Labels)
		attrs["name"] = c.Name[1:]
	}
	ev := &dockerapi.APIEvents{Type: "container", Action: action, Status: action, ID: id,
		Actor: dockerapi.APIActor{ID: id, Attributes: attrs}, Time: time.Now().Unix()}
	for _, l := range f.listeners {
		select {
		case l <- ev:
		default:
		}
	}
}

// stop marks id exited (no event).
func (p *podmanEngine) stop(id string) {
	p.fakeEngine.mu.Lock()
	defer p.fakeEngine.mu.Unlock()
	p.world[id].State = dockerapi.State{Running: false, ExitCode: 137}
}

// start gives id a new process (no event).
func (p *podmanEngine) start(id string) {
	p.fakeEngine.mu.Lock()
	defer p.fakeEngine.mu.Unlock()
	fakePid++
	p.world[id].State = dockerapi.State{Running: true, Pid: fakePid}
}

func TestPodmanStopAndRemovalFollowEvents(t *testing.T) {
	testenv.CheckGoroutines(t)
	p := newPodmanEngine()
	sink := newRecordingSink()
	sink.keys = nil
	routes := map[uint16]string{6000: "web"}
	id := p.add("web", "none", map[string]string{"connect.6000": "web"})
	w, _ := newFakeWatcher(t, p.fakeEngine, sink, never)
	w.eng = p
	startWatcher(t, w)
	sink.waitApplied(t, id, routes)

	// podman stop: only the events can tell, the resync is an hour away.
	p.stop(id)
	p.send("died", id)
	p.send("cleanup", id)
	p.send("cleanup", id)
	sink.waitRemoved(t, id)

	// podman start sends "init", then "start".
	p.start(id)
	p.send("init", id)
	p.send("start", id)
	sink.waitApplied(t, id, routes)

	// A removal whose death went unseen (the library drops events when the
	// watcher's channel is full): "remove" alone must tear it down.
	p.remove(id)
	p.send("remove", id)
	sink.waitRemoved(t, id)
	if ns := w.Namespaces(); len(ns) != 0 {
		t.Errorf("Namespaces() = %+v after removal; want none", ns)
	}
}

// A pod's members join the network namespace of its infra container, which
// podman's inspect reports as HostConfig.NetworkMode "container:<infra ID>"
// (the infra itself: "none", or the pod's network), each member with a
// State.Pid of its own in that namespace. The watcher merges them as it does
// Docker's --network container:<id>, keyed by the infra container.
func TestPodmanPodMembersShareOneNamespace(t *testing.T) {
	testenv.CheckGoroutines(t)
	p := newPodmanEngine()
	sink := newRecordingSink()
	sink.keys = nil
	w, _ := newFakeWatcher(t, p.fakeEngine, sink, never)
	w.eng = p
	startWatcher(t, w)
	waitFor(t, "healthy", w.Healthy, sink)

	// podman pod create + two podman run --pod, in podman's order of events.
	infra := p.add("pod-infra", "none", map[string]string{"connectable.test": "1"})
	a := p.add("member-a", "container:"+infra, map[string]string{"connect.6000": "a"})
	b := p.add("member-b", "container:"+infra, map[string]string{"connect.6001": "b"})
	for _, id := range []string{infra, a, b} {
		p.setNetns(id, 4026532182)
	}
	for _, id := range []string{infra, a, b} {
		p.send("init", id)
		p.send("start", id)
	}
	got := sink.waitApplied(t, infra, map[uint16]string{6000: "a", 6001: "b"})
	if want := netnsPath(p.pid(infra)); got.netns != want {
		t.Errorf("netns = %q; want the infra container's %q", got.netns, want)
	}
	for _, id := range []string{a, b} {
		if calls := sink.callsFor(id); len(calls) != 0 {
			t.Errorf("a member got calls of its own: %v", calls)
		}
	}

	// podman rm -f of one member leaves the other's route.
	p.remove(b)
	for _, ev := range []string{"died", "cleanup", "remove"} {
		p.send(ev, b)
	}
	sink.waitApplied(t, infra, map[uint16]string{6000: "a"})

	// podman pod stop: the members die, then the infra.
	for _, id := range []string{a, infra} {
		p.stop(id)
		p.send("died", id)
		p.send("cleanup", id)
	}
	sink.waitRemoved(t, infra)
}

// A container in Podman's --network ns:<path> is set up at that path, which
// outlives it, so that its rules can be cleared after it is gone; but only
// while the path holds the container's namespace.
func TestPodmanNamespacePath(t *testing.T) {
	testenv.CheckGoroutines(t)
	dir := t.TempDir()
	ns, other := dir+"/ns", dir+"/other"
	for _, path := range []string{ns, other} {
		if err := os.WriteFile(path, nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	p := newPodmanEngine()
	sink := newRecordingSink()
	sink.keys = nil
	joined := p.add("joined", "ns:"+ns, map[string]string{"connect.6000": "a"})
	p.setNetns(joined, pathInode(ns))
	// The path names another namespace than the process is in (say, a
	// path reused since): the process's own is set up.
	stale := p.add("stale", "ns:"+other, map[string]string{"connect.6000": "b"})
	p.setNetns(stale, pathInode(ns))
	w, _ := newFakeWatcher(t, p.fakeEngine, sink, never)
	w.eng = p
	startWatcher(t, w)

	if got := sink.waitApplied(t, joined, map[uint16]string{6000: "a"}); got.netns != ns {
		t.Errorf("netns = %q; want the ns:<path> %q", got.netns, ns)
	}
	if got, want := sink.waitApplied(t, stale, map[uint16]string{6000: "b"}), netnsPath(p.pid(stale)); got.netns != want {
		t.Errorf("netns = %q; want the process's %q", got.netns, want)
	}
}
