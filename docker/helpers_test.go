package docker

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	dockerapi "github.com/fsouza/go-dockerclient"

	"github.com/connectable/connectable/internal/testenv"
	"github.com/connectable/connectable/netns"
	"github.com/connectable/connectable/reconcile"
)

// call is one Sink call the recordingSink saw.
type call struct {
	op     string // "apply" or "remove"
	key    string
	netns  string
	routes map[uint16]string
}

func (c call) String() string {
	if c.op == "remove" {
		return fmt.Sprintf("remove(%s)", short(c.key))
	}
	return fmt.Sprintf("apply(%s, %s, %v)", short(c.key), c.netns, c.routes)
}

// recordingSink remembers the calls for the keys a test cares about (other
// tests' containers share the engine) and the resulting state.
type recordingSink struct {
	mu    sync.Mutex
	keys  map[string]bool // nil: every key
	tag   string          // also record keys applied with a service containing tag
	calls []call
	state map[string]call // key → last successful apply

	// fail optionally makes a call fail.
	fail func(c call) error
	// block optionally holds a call until the returned channel closes.
	block func(c call) <-chan struct{}

	rec *reconcile.Reconciler // set by via
}

func newRecordingSink() *recordingSink {
	return &recordingSink{keys: make(map[string]bool), state: make(map[string]call)}
}

// svc returns a service name unique to this sink's test, so the sink
// records the namespaces that carry it and ignores other tests' ones.
func (s *recordingSink) svc(name string) string { return name + "." + s.tag }

// watch makes the sink record key.
func (s *recordingSink) watch(keys ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, k := range keys {
		s.keys[k] = true
	}
}

func (s *recordingSink) record(ctx context.Context, c call) error {
	s.mu.Lock()
	if s.keys != nil && !s.keys[c.key] {
		if s.tag == "" || !slices.ContainsFunc(slices.Collect(maps.Values(c.routes)), func(v string) bool { return strings.Contains(v, s.tag) }) {
			s.mu.Unlock()
			return nil
		}
		s.keys[c.key] = true
	}
	s.calls = append(s.calls, c)
	fail, block := s.fail, s.block
	s.mu.Unlock()
	if block != nil {
		if ch := block(c); ch != nil {
			select {
			case <-ch:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	}
	if fail != nil {
		if err := fail(c); err != nil {
			return err
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if c.op == "remove" {
		delete(s.state, c.key)
	} else {
		s.state[c.key] = c
	}
	return nil
}

func (s *recordingSink) Apply(ctx context.Context, key, netns string, routes map[uint16]string) error {
	return s.record(ctx, call{op: "apply", key: key, netns: netns, routes: routes})
}

func (s *recordingSink) Remove(ctx context.Context, key string) error {
	return s.record(ctx, call{op: "remove", key: key})
}

// current returns key's applied state and whether it has one.
func (s *recordingSink) current(key string) (call, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c, ok := s.state[key]
	return c, ok
}

func (s *recordingSink) callsFor(key string) []call {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []call
	for _, c := range s.calls {
		if c.key == key {
			out = append(out, c)
		}
	}
	return out
}

func (s *recordingSink) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var b strings.Builder
	for _, c := range s.calls {
		b.WriteString(c.String())
		b.WriteByte('\n')
	}
	return b.String()
}

// waitApplied waits until key is applied with exactly routes and returns the
// call.
func (s *recordingSink) waitApplied(t *testing.T, key string, routes map[uint16]string) call {
	t.Helper()
	var got call
	waitFor(t, fmt.Sprintf("apply(%s, %v)", short(key), routes), func() bool {
		c, ok := s.current(key)
		got = c
		return ok && maps.Equal(c.routes, routes)
	}, s)
	return got
}

// waitRemoved waits until key had a Remove after an Apply.
func (s *recordingSink) waitRemoved(t *testing.T, key string) {
	t.Helper()
	waitFor(t, "remove("+short(key)+")", func() bool {
		calls := s.callsFor(key)
		return len(calls) > 0 && calls[len(calls)-1].op == "remove"
	}, s)
}

// waitFor polls cond for a generous while: the machine is slow and shared.
func waitFor(t *testing.T, what string, cond func() bool, state fmt.Stringer) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s; sink calls:\n%v", what, state)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func newLogger(t *testing.T) (*slog.Logger, *testenv.SyncBuffer) {
	var buf testenv.SyncBuffer
	return testenv.Logger(t, &buf), &buf
}

// startWatcher runs w until the test ends and checks that Run returns nil
// and leaves no goroutine behind.
func startWatcher(t *testing.T, w *Watcher) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run returned %v; want nil", err)
			}
		case <-time.After(30 * time.Second):
			t.Errorf("Run did not return after cancellation")
		}
		if w.Healthy() {
			t.Errorf("Healthy() = true after Run returned")
		}
	})
}

// fakeEngine is a Docker Engine in memory, for the faults a real one cannot
// be made to produce on demand. Like go-dockerclient, it drops events a full
// listener cannot take and closes listeners when the stream ends.
type fakeEngine struct {
	mu         sync.Mutex
	world      map[string]*dockerapi.Container
	listeners  []chan<- *dockerapi.APIEvents
	subscribes int
	down       bool   // subscribing and listing fail
	onList     func() // called during ListContainers, after the snapshot
	// onInspect optionally runs at the start of every inspection, outside
	// the lock, e.g. to hold one like a stuck engine does.
	onInspect func(opts dockerapi.InspectContainerOptions)
	inspects  map[string]int
	netns     map[int]uint64 // pid → namespace inode; absent: unknown
	lists     int            // ListContainers calls
	// published holds each container's published ports as the listing
	// shows them; its networks come from NetworkSettings.Networks.
	published map[string][]dockerapi.APIPort
}

func newFakeEngine() *fakeEngine {
	return &fakeEngine{world: make(map[string]*dockerapi.Container), inspects: make(map[string]int), netns: make(map[int]uint64),
		published: make(map[string][]dockerapi.APIPort)}
}

var errEngineDown = fmt.Errorf("dial unix /var/run/docker.sock: connect: connection refused")

func (f *fakeEngine) AddEventListenerWithOptions(_ dockerapi.EventsOptions, l chan<- *dockerapi.APIEvents) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.subscribes++
	if f.down {
		return errEngineDown
	}
	f.listeners = append(f.listeners, l)
	return nil
}

func (f *fakeEngine) RemoveEventListener(l chan *dockerapi.APIEvents) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i, x := range f.listeners {
		if x == l {
			f.listeners = append(f.listeners[:i], f.listeners[i+1:]...)
			break
		}
	}
	return nil
}

func (f *fakeEngine) ListContainers(opts dockerapi.ListContainersOptions) ([]dockerapi.APIContainers, error) {
	f.mu.Lock()
	f.lists++
	if f.down {
		f.mu.Unlock()
		return nil, errEngineDown
	}
	var out []dockerapi.APIContainers
	for _, c := range f.world {
		if c.State.Running {
			lc := dockerapi.APIContainers{ID: c.ID, Names: []string{c.Name}, Labels: maps.Clone(c.Config.Labels), State: "running",
				Ports: slices.Clone(f.published[c.ID])}
			if c.NetworkSettings != nil {
				lc.Networks.Networks = maps.Clone(c.NetworkSettings.Networks)
			}
			out = append(out, lc)
		}
	}
	hook := f.onList
	f.onList = nil
	f.mu.Unlock()
	if hook != nil {
		hook()
	}
	return out, nil
}

func (f *fakeEngine) InspectContainerWithOptions(opts dockerapi.InspectContainerOptions) (*dockerapi.Container, error) {
	f.mu.Lock()
	hook := f.onInspect
	f.mu.Unlock()
	if hook != nil {
		hook(opts)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.inspects[opts.ID]++
	c := f.world[opts.ID]
	if c == nil || f.down {
		if f.down {
			return nil, errEngineDown
		}
		return nil, &dockerapi.NoSuchContainer{ID: opts.ID}
	}
	cp := *c
	cp.Config = &dockerapi.Config{Labels: maps.Clone(c.Config.Labels)}
	cp.HostConfig = &dockerapi.HostConfig{NetworkMode: c.HostConfig.NetworkMode}
	return &cp, nil
}

var fakePid = 100000

// add puts a running container in the world (no event) and returns its ID.
func (f *fakeEngine) add(name, mode string, labels map[string]string) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	fakePid++
	sum := sha256.Sum256(fmt.Appendf(nil, "%s-%d", name, fakePid))
	id := hex.EncodeToString(sum[:])
	if mode == "" {
		mode = "default"
	}
	f.world[id] = &dockerapi.Container{
		ID:         id,
		Name:       "/" + name,
		Created:    time.Unix(int64(fakePid), 0),
		State:      dockerapi.State{Running: true, Pid: fakePid},
		Config:     &dockerapi.Config{Labels: labels},
		HostConfig: &dockerapi.HostConfig{NetworkMode: mode},
	}
	return id
}

func (f *fakeEngine) pid(id string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.world[id].State.Pid
}

// inode returns the namespace inode of pid, as the watcher's nsInode.
func (f *fakeEngine) inode(pid int) uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.netns[pid]
}

// setNetns records the namespace inode of id's process.
func (f *fakeEngine) setNetns(id string, ino uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.netns[f.world[id].State.Pid] = ino
}

// restart gives id a new process (no event).
func (f *fakeEngine) restart(id string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fakePid++
	f.world[id].State.Pid = fakePid
}

// remove takes a container out of the world (no event).
func (f *fakeEngine) remove(id string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.world, id)
}

// emit sends a container event to every listener that has room.
func (f *fakeEngine) emit(action, id string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	ev := &dockerapi.APIEvents{Type: "container", Action: action, Status: action, ID: id, Actor: dockerapi.APIActor{ID: id}, Time: time.Now().Unix()}
	for _, l := range f.listeners {
		select {
		case l <- ev:
		default:
		}
	}
}

// endStream closes every listener, as the library does when it gives up.
func (f *fakeEngine) endStream() {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, l := range f.listeners {
		close(l)
	}
	f.listeners = nil
}

func (f *fakeEngine) setDown(down bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.down = down
}

func (f *fakeEngine) subscriptions() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.subscribes
}

// via returns the real reconciler, with quick retries, delivering to s: the
// watcher's Sink in these tests. It is closed when the test ends, after the
// watcher (cleanups run last-in first-out).
func (s *recordingSink) via(t *testing.T, logger *slog.Logger) *reconcile.Reconciler {
	rec := reconcile.New(reconcile.Config{Paths: []reconcile.Path{s}, Logger: logger,
		RetryMin: 20 * time.Millisecond, RetryMax: 100 * time.Millisecond})
	t.Cleanup(rec.Close)
	s.rec = rec
	return rec
}

// status returns the reconciler's view of key.
func (s *recordingSink) status(key string) (reconcile.Status, bool) {
	for _, st := range s.rec.Status() {
		if st.Key == key {
			return st, true
		}
	}
	return reconcile.Status{}, false
}

// newFakeWatcher returns a watcher on a fake engine with quick retries.
func newFakeWatcher(t *testing.T, f *fakeEngine, sink *recordingSink, resync time.Duration) (*Watcher, *testenv.SyncBuffer) {
	logger, lb := newLogger(t)
	w := newWatcher(Config{Sink: sink.via(t, logger), ResyncInterval: resync, Logger: logger}, f)
	w.backoff = [2]time.Duration{10 * time.Millisecond, 50 * time.Millisecond}
	w.nsInode, w.forbidden = f.inode, map[uint64]bool{}
	w.openNS = noNamespace
	return w, lb
}

// noNamespace stands for openNamespace with the fake engine, whose PIDs are
// nobody's: no handle, so the namespaces keep their paths.
func noNamespace(context.Context, *dockerapi.Container) (*netns.Handle, error) { return nil, nil }
