// Package docker owns connectable's view of the Docker Engine: it follows
// container events, reads each running container's connect.<port>=<service>
// labels, and keeps, per network namespace, the desired port → service routes
// of every container in it. It hands that state to a Sink, which installs the
// listeners and rules; this package never touches a namespace itself.
//
// A namespace is named by a key, the ID of the container that owns it (for
// --network container:<id>, the container named there), and found at
// /proc/<pid>/ns/net of that owner's main process (at the path itself for
// Podman's --network ns:<path>, which outlives the container). Containers in
// host network mode are never set up: rules there would capture the host's
// own traffic.
//
// Typical usage:
//
//	client, err := docker.NewClient() // DOCKER_HOST etc.
//	if err != nil {
//		return err
//	}
//	w := docker.NewWatcher(docker.Config{
//		Client: client,
//		Sink:   srv, // e.g. *proxy.Server
//		SelfID: docker.SelfContainerID(),
//		Logger: logger,
//	})
//	return w.Run(ctx) // until ctx ends
package docker

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	dockerapi "github.com/fsouza/go-dockerclient"
)

// Sink receives the desired state of each network namespace. The watcher
// calls it from one goroutine per key at a time, so calls for one key never
// overlap while calls for different keys run concurrently.
type Sink interface {
	// Apply makes the namespace at netns route each port to its service.
	// key names one network namespace; routes are the merged labels of
	// every running container in it, never empty, and must not be
	// modified. Apply must be idempotent: it is called again with the same
	// state after it failed.
	Apply(ctx context.Context, key, netns string, routes map[uint16]string) error
	// Remove forgets the namespace key; its namespace may be gone already.
	Remove(ctx context.Context, key string) error
}

// Config configures a Watcher. Client and Sink are required.
type Config struct {
	// Client talks to the engine; see NewClient.
	Client *dockerapi.Client
	// Sink receives each namespace's state.
	Sink Sink
	// Validate optionally checks a label's value (a service name); a
	// label it rejects is skipped. If nil, any value that is not blank is
	// accepted.
	Validate func(value string) error
	// ResyncInterval optionally sets how often the full list of running
	// containers is read again, to recover events the engine or the client
	// library dropped; if zero, 30s.
	ResyncInterval time.Duration
	// SelfID optionally names the container this daemon runs in (full ID,
	// see SelfContainerID); it is never set up.
	SelfID string
	// Logger optionally receives the watcher's logs; if nil, slog.Default().
	Logger *slog.Logger
}

// Namespace is the desired state of one network namespace, as shown on a
// status page.
type Namespace struct {
	Key        string            // ID of the container owning the namespace
	Path       string            // /proc/<pid>/ns/net, or the path of Podman's --network ns:<path>
	Containers []Container       // running containers in it, owner first
	Routes     map[uint16]string // port → service
	Err        string            // the last Sink error for this key, "" after a success
}

// Container names one container of a Namespace.
type Container struct {
	ID   string // short (12 hex digits)
	Name string // without the leading slash
}

// NewClient returns a client configured as Docker users expect, from
// DOCKER_HOST, DOCKER_TLS_VERIFY and DOCKER_CERT_PATH (and DOCKER_API_VERSION),
// defaulting to the local socket unix:///var/run/docker.sock.
func NewClient() (*dockerapi.Client, error) {
	c, err := dockerapi.NewClientFromEnv()
	if err != nil {
		return nil, fmt.Errorf("creating docker client from environment: %w", err)
	}
	return c, nil
}

const (
	defaultResync  = 30 * time.Second
	minBackoff     = 250 * time.Millisecond
	maxBackoff     = 5 * time.Second
	stableAfter    = 10 * time.Second // a stream up this long resets the backoff
	callTimeout    = 30 * time.Second // one list or inspect call
	eventBuffer    = 256
	sinceSlack     = 2 * time.Second // replayed before subscribing: engine clock skew
	maxOwnerChains = 4               // container:<a> whose a is container:<b> ...
)

// Watcher follows the engine and drives a Sink. Create it with NewWatcher.
type Watcher struct {
	cfg      Config
	eng      engine
	log      *slog.Logger
	resyncIv time.Duration
	backoff  [2]time.Duration // min, max; tests shorten them
	// nsInode identifies a process's network namespace (0: unknown), and
	// forbidden holds those never to set up: the host's and our own.
	// Tests replace both, since their fake PIDs are real processes'.
	nsInode   func(pid int) uint64
	forbidden map[uint64]bool

	running atomic.Bool
	healthy atomic.Bool
	stats   struct {
		subscriptions, resyncs, resyncErrors atomic.Uint64
	}

	// Owned by Run's goroutine.
	containers map[string]*container      // running, labelled or owning a labelled one's namespace
	warned     map[string]map[string]bool // container ID → what was logged about it
	lost       bool                       // the event stream is down and that was logged
	started    bool                       // the stream was up once

	// mu guards what Namespaces and the delivery workers share with Run.
	mu      sync.Mutex
	desired map[string]*nsState
	keys    map[string]*keyState
	workers sync.WaitGroup
}

// container is what the watcher keeps of one inspected container. It is
// never modified once stored, so snapshots may share it.
type container struct {
	id      string
	name    string
	created time.Time
	pid     int
	key     string // ID of the container whose namespace it uses (its own or container:<id>)
	netIno  uint64 // inode of its network namespace, 0 if unknown
	netns   string // path of its network namespace
	routes  map[uint16]string
	labeled bool // has connect.* labels, valid or not
}

// nsState is the desired state of one namespace.
type nsState struct {
	path    string
	members []Container
	routes  map[uint16]string
}

// NewWatcher returns a Watcher for cfg. It does nothing until Run.
func NewWatcher(cfg Config) *Watcher {
	w := newWatcher(cfg, nil)
	if cfg.Client != nil {
		w.eng = newEngineClient(cfg.Client)
	}
	return w
}

func newWatcher(cfg Config, eng engine) *Watcher {
	w := &Watcher{
		cfg:        cfg,
		eng:        eng,
		log:        cfg.Logger,
		resyncIv:   cfg.ResyncInterval,
		backoff:    [2]time.Duration{minBackoff, maxBackoff},
		containers: make(map[string]*container),
		warned:     make(map[string]map[string]bool),
		desired:    make(map[string]*nsState),
		keys:       make(map[string]*keyState),
		nsInode:    netnsInode,
		forbidden:  make(map[uint64]bool),
	}
	// PID 1 is the host's init when we run on the host or with
	// --pid=host; self is the host on the host. A container can land in
	// either namespace in ways its own network mode does not show
	// (container:<a host-mode container>).
	for _, p := range []string{"/proc/1/ns/net", "/proc/self/ns/net"} {
		if ino := pathInode(p); ino != 0 {
			w.forbidden[ino] = true
		}
	}
	if w.log == nil {
		w.log = slog.Default()
	}
	w.log = w.log.With("component", "docker")
	if w.resyncIv <= 0 {
		w.resyncIv = defaultResync
	}
	return w
}

// Healthy reports whether the event stream is up and the last full resync
// succeeded.
func (w *Watcher) Healthy() bool { return w.healthy.Load() }

// Stats counts what the watcher did since it was made, for metrics.
type Stats struct {
	// Reconnects counts event-stream subscriptions after the first.
	Reconnects uint64
	// Resyncs counts full resynchronisations, and ResyncErrors those that
	// failed.
	Resyncs, ResyncErrors uint64
}

// Stats returns the watcher's counters.
func (w *Watcher) Stats() Stats {
	subs := w.stats.subscriptions.Load()
	return Stats{
		Reconnects:   max(subs, 1) - 1,
		Resyncs:      w.stats.resyncs.Load(),
		ResyncErrors: w.stats.resyncErrors.Load(),
	}
}

// Namespaces returns the current desired state of every namespace that has
// routes, sorted by key. The result is a copy.
func (w *Watcher) Namespaces() []Namespace {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := make([]Namespace, 0, len(w.desired))
	for key, ns := range w.desired {
		n := Namespace{
			Key:        key,
			Path:       ns.path,
			Containers: slices.Clone(ns.members),
			Routes:     maps.Clone(ns.routes),
		}
		if ks := w.keys[key]; ks != nil && ks.err != nil {
			n.Err = ks.err.Error()
		}
		out = append(out, n)
	}
	slices.SortFunc(out, func(a, b Namespace) int { return strings.Compare(a.Key, b.Key) })
	return out
}

// Run follows the engine until ctx ends, then waits for Sink calls in flight
// and returns nil. It subscribes to events before listing containers, so
// nothing that happens during the listing is missed, and subscribes again,
// with backoff, whenever the event stream ends. Run may be called once at a
// time.
func (w *Watcher) Run(ctx context.Context) error {
	if w.eng == nil || w.cfg.Sink == nil {
		return errors.New("docker: watcher needs a Client and a Sink")
	}
	if !w.running.CompareAndSwap(false, true) {
		return errors.New("docker: watcher is already running")
	}
	defer w.running.Store(false)
	// Deferred calls run last-in first-out: workers are waited for after
	// the health flag drops.
	defer w.workers.Wait()
	defer w.healthy.Store(false)

	backoff := w.backoff[0]
	for {
		upFor, err := w.session(ctx)
		w.healthy.Store(false)
		if ctx.Err() != nil {
			return nil
		}
		if !w.lost {
			w.lost = true
			if w.started {
				w.log.Warn("docker event stream lost; reconnecting", "err", err)
			} else {
				w.log.Warn("docker engine unreachable; retrying", "err", err)
			}
		} else {
			w.log.Debug("docker event stream still down", "err", err, "retry_in", backoff)
		}
		if upFor >= stableAfter {
			backoff = w.backoff[0]
		}
		if !sleep(ctx, backoff) {
			return nil
		}
		backoff = min(2*backoff, w.backoff[1])
	}
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

var errStreamEnded = errors.New("docker event stream ended")

// lifecycleEvents are the container events, of Docker and of Podman's
// Docker-compatible API, after which a container may have started or ended:
// each is only a hint to inspect it again. Podman matches the event filter
// against its own names but sends Docker's in the event, so both spellings
// are here: it filters on "died" and then sends "die", and it sends
// "remove" where Docker sends "destroy". An engine ignores names it does
// not know.
var lifecycleEvents = []string{
	"start", "restart", "restore", // running now
	"stop", "kill", "oom", "die", "died", "exited", "cleanup", "checkpoint", // may have ended
	"destroy", "remove", // gone
}

// session subscribes, resyncs and follows events until the stream ends or ctx
// does, and says how long the stream was up.
func (w *Watcher) session(ctx context.Context) (time.Duration, error) {
	ch := make(chan *dockerapi.APIEvents, eventBuffer)
	opts := dockerapi.EventsOptions{
		// The library connects in the background after returning, so the
		// stream may start after the listing below: replaying from a bit
		// before now closes that gap (events are only hints, so one seen
		// twice costs one inspect).
		Since: strconv.FormatInt(time.Now().Add(-sinceSlack).Unix(), 10),
		Filters: map[string][]string{
			"type":  {"container"},
			"event": lifecycleEvents,
		},
	}
	if err := w.eng.AddEventListenerWithOptions(opts, ch); err != nil {
		return 0, fmt.Errorf("subscribing to docker events: %w", err)
	}
	defer func() {
		if err := w.eng.RemoveEventListener(ch); err != nil {
			w.log.Debug("removing docker event listener", "err", err)
		}
	}()
	w.stats.subscriptions.Add(1)
	if err := w.resync(ctx); err != nil {
		return 0, err
	}
	w.healthy.Store(true)
	switch {
	case w.lost:
		w.log.Info("docker event stream back")
	case !w.started:
		w.log.Info("following docker events", "containers", len(w.containers))
	}
	w.lost, w.started = false, true
	up := time.Now()
	err := w.follow(ctx, ch)
	return time.Since(up), err
}

// follow handles events, in order, and periodic resyncs until the stream
// ends or ctx does.
func (w *Watcher) follow(ctx context.Context, ch <-chan *dockerapi.APIEvents) error {
	tick := time.NewTicker(w.resyncIv)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
			if err := w.resync(ctx); err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				w.healthy.Store(false)
				w.log.Warn("docker resync failed; retrying at the next one", "err", err, "in", w.resyncIv)
				continue
			}
			w.healthy.Store(true)
		case ev, ok := <-ch:
			if !ok {
				return errStreamEnded
			}
			// Take whatever else is queued too: a burst of events about
			// one container then costs one inspect.
			ids := w.eventIDs(nil, ev)
			closed := false
		drain:
			for {
				select {
				case ev, ok := <-ch:
					if !ok {
						closed = true
						break drain
					}
					ids = w.eventIDs(ids, ev)
				default:
					break drain
				}
			}
			for _, id := range ids {
				w.refresh(ctx, id)
			}
			if len(ids) > 0 {
				w.reconcile(ctx, false)
			}
			if closed {
				return errStreamEnded
			}
		}
	}
}

// eventIDs appends the container ev is about, once, if it may matter.
func (w *Watcher) eventIDs(ids []string, ev *dockerapi.APIEvents) []string {
	if ev == nil || (ev.Type != "" && ev.Type != "container") {
		return ids
	}
	if !slices.Contains(lifecycleEvents, cmp.Or(ev.Action, ev.Status)) {
		return ids
	}
	id := cmp.Or(ev.Actor.ID, ev.ID)
	if id == "" || slices.Contains(ids, id) {
		return ids
	}
	// The engine copies a container's labels into its events: a container
	// without connect.* labels matters only if it holds the namespace of
	// one that has them, and then it is known already.
	if attrs := ev.Actor.Attributes; len(attrs) > 0 && !hasRouteLabels(attrs) && w.containers[id] == nil && !w.referenced(id) {
		return ids
	}
	return append(ids, id)
}

// resync reads the full list of running containers and re-inspects those
// that matter, then reconciles every namespace (retrying failed Sink calls).
func (w *Watcher) resync(ctx context.Context) error {
	w.stats.resyncs.Add(1)
	lctx, cancel := context.WithTimeout(ctx, callTimeout)
	list, err := w.eng.ListContainers(dockerapi.ListContainersOptions{Context: lctx})
	cancel()
	if err != nil {
		w.stats.resyncErrors.Add(1)
		return fmt.Errorf("listing containers: %w", err)
	}
	running := make(map[string]bool, len(list))
	for _, c := range list {
		running[c.ID] = true
	}
	for id := range w.containers {
		if !running[id] {
			w.forget(id)
		}
	}
	for id := range w.warned {
		if !running[id] {
			delete(w.warned, id)
		}
	}
	for _, c := range list {
		if hasRouteLabels(c.Labels) || w.containers[c.ID] != nil {
			w.refresh(ctx, c.ID)
		}
	}
	w.prune()
	w.reconcile(ctx, true)
	return ctx.Err()
}

// refresh re-inspects one container and records what is true of it now.
func (w *Watcher) refresh(ctx context.Context, id string) {
	c, err := w.inspect(ctx, id)
	if err != nil {
		if nsc := (*dockerapi.NoSuchContainer)(nil); errors.As(err, &nsc) {
			w.log.Debug("container gone", "id", short(id))
			w.forget(id)
			delete(w.warned, id)
			return
		}
		if ctx.Err() == nil {
			// The state stays as it was; the next resync looks again.
			w.log.Warn("inspecting container", "id", short(id), "err", err)
		}
		return
	}
	w.observe(ctx, c, 0)
}

func (w *Watcher) inspect(ctx context.Context, id string) (*dockerapi.Container, error) {
	ictx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	c, err := w.eng.InspectContainerWithOptions(dockerapi.InspectContainerOptions{ID: id, Context: ictx})
	if err != nil {
		return nil, err
	}
	if c == nil || c.ID == "" {
		return nil, fmt.Errorf("inspecting container %s: empty answer", short(id))
	}
	return c, nil
}

// observe records an inspected container: kept if it runs and either asks
// for routes or owns the namespace of one that does, forgotten otherwise.
func (w *Watcher) observe(ctx context.Context, c *dockerapi.Container, depth int) {
	id, name := c.ID, strings.TrimPrefix(c.Name, "/")
	if !c.State.Running || c.State.Pid == 0 {
		w.log.Debug("container not running", "container", name, "id", short(id))
		w.forget(id)
		delete(w.warned, id)
		return
	}
	if w.isSelf(id) {
		w.forget(id)
		return
	}
	var labels map[string]string
	if c.Config != nil {
		labels = c.Config.Labels
	}
	labeled := hasRouteLabels(labels)
	if !labeled && !w.referenced(id) {
		w.forget(id)
		return
	}
	var mode string
	if c.HostConfig != nil {
		mode = c.HostConfig.NetworkMode
	}
	if mode == "host" {
		if labeled {
			w.warnOnce(id, "host", "skipping container in host network mode: rules there would capture the host's own traffic",
				"container", name, "id", short(id))
		}
		w.forget(id)
		return
	}
	routes, errs := ParseRoutes(labels, w.cfg.Validate)
	for _, err := range errs {
		var le *LabelError
		if errors.As(err, &le) {
			w.warnOnce(id, "label:"+le.Label, "skipping label", "container", name, "id", short(id),
				"label", le.Label, "value", le.Value, "err", le.Err)
		}
	}
	ct := &container{
		id:      id,
		name:    name,
		created: c.Created,
		pid:     c.State.Pid,
		key:     id,
		netIno:  w.nsInode(c.State.Pid),
		netns:   netnsPath(c.State.Pid),
		routes:  routes,
		labeled: labeled,
	}
	// Podman's --network ns:<path> joins a namespace that outlives the
	// container: reached by the container's PID, its rules could not be
	// cleared once the container is gone. The path is used only while it
	// holds the very namespace the container's process is in.
	if p, ok := strings.CutPrefix(mode, "ns:"); ok && ct.netIno != 0 && pathInode(p) == ct.netIno {
		ct.netns = p
	}
	owner, shared := strings.CutPrefix(mode, "container:")
	if !shared || owner == "" {
		w.containers[id] = ct
		return
	}
	if w.isSelf(owner) {
		w.warnOnce(id, "self", "skipping container that shares this daemon's network namespace", "container", name, "id", short(id))
		w.forget(id)
		return
	}
	ct.key = owner
	if o := w.containers[owner]; o != nil || depth >= maxOwnerChains {
		w.containers[id] = ct
		return
	}
	// The owner is new to us. Inspect it by the reference the engine
	// recorded (an ID in practice, a name would do too) and key the
	// namespace by its full ID.
	oc, err := w.inspect(ctx, owner)
	if err != nil {
		w.log.Debug("inspecting namespace owner", "container", name, "owner", owner, "err", err)
		w.containers[id] = ct
		return
	}
	if oc.HostConfig != nil && oc.HostConfig.NetworkMode == "host" {
		w.warnOnce(id, "host", "skipping container that joined a host-mode container: rules there would capture the host's own traffic",
			"container", name, "id", short(id), "owner", strings.TrimPrefix(oc.Name, "/"))
		w.forget(id)
		return
	}
	ct.key = oc.ID
	w.containers[id] = ct
	if oc.ID != id {
		w.observe(ctx, oc, depth+1)
	}
}

// forget drops a container. Its warnings stay, so a container that keeps
// running in host mode is not warned about at every resync.
func (w *Watcher) forget(id string) { delete(w.containers, id) }

// referenced reports whether a kept container uses id's namespace.
func (w *Watcher) referenced(id string) bool {
	for _, c := range w.containers {
		if c.key == id && c.id != id {
			return true
		}
	}
	return false
}

// prune drops owners kept only for containers that are gone.
func (w *Watcher) prune() {
	for {
		dropped := false
		for id, c := range w.containers {
			if !c.labeled && !w.referenced(id) {
				delete(w.containers, id)
				dropped = true
			}
		}
		if !dropped {
			return
		}
	}
}

func (w *Watcher) isSelf(id string) bool {
	self := w.cfg.SelfID
	return self != "" && (id == self || (len(self) >= 12 && strings.HasPrefix(id, self)))
}

// warnOnce logs msg the first time it is said about what for container id.
func (w *Watcher) warnOnce(id, what, msg string, args ...any) {
	seen := w.warned[id]
	if seen == nil {
		seen = make(map[string]bool)
		w.warned[id] = seen
	}
	if seen[what] {
		return
	}
	seen[what] = true
	w.log.Warn(msg, args...)
}

// namespaceOf returns the container whose ID keys c's namespace: its own, or
// that of the container it joined (following owners that joined another).
// A container whose owner stopped, or restarted into a new namespace, is
// still in the old one, alone: it then keys that namespace itself.
func (w *Watcher) namespaceOf(c *container) *container {
	cur := c
	for range maxOwnerChains {
		if cur.key == cur.id {
			return cur
		}
		o := w.containers[cur.key]
		if o == nil || (o.netIno != 0 && cur.netIno != 0 && o.netIno != cur.netIno) {
			return cur
		}
		cur = o
	}
	return cur
}

// reconcile computes every namespace's desired state from the kept
// containers and hands what changed to the delivery workers. With retry,
// keys whose last Sink call failed are delivered again too.
func (w *Watcher) reconcile(ctx context.Context, retry bool) {
	groups := make(map[string][]*container)
	for _, c := range w.containers {
		owner := w.namespaceOf(c)
		groups[owner.id] = append(groups[owner.id], c)
	}
	desired := make(map[string]*nsState, len(groups))
	for key, members := range groups {
		// Earlier containers keep a disputed port: a newcomer never takes
		// a route away from one already set up. The owner came first.
		slices.SortFunc(members, func(a, b *container) int {
			if a.id == key || b.id == key {
				return boolCmp(b.id == key, a.id == key)
			}
			return cmp.Or(a.created.Compare(b.created), strings.Compare(a.id, b.id))
		})
		routes := make(map[uint16]string)
		claimedBy := make(map[uint16]*container)
		ns := &nsState{path: members[0].netns}
		for _, c := range members {
			ns.members = append(ns.members, Container{ID: short(c.id), Name: c.name})
			for _, port := range slices.Sorted(maps.Keys(c.routes)) {
				svc := c.routes[port]
				if have, ok := routes[port]; ok {
					if have != svc {
						label := LabelPrefix + strconv.Itoa(int(port))
						w.warnOnce(c.id, "conflict:"+label, "skipping label: another container in the network namespace claims the port",
							"container", c.name, "id", short(c.id), "label", label, "value", svc,
							"claimed_by", claimedBy[port].name, "service", have)
					}
					continue
				}
				routes[port] = svc
				claimedBy[port] = c
			}
		}
		if len(routes) == 0 {
			continue
		}
		if owner := w.containers[key]; w.forbidden[owner.netIno] {
			w.warnOnce(key, "hostns", "skipping namespace: it is the host's or this daemon's own",
				"container", owner.name, "id", short(key))
			continue
		}
		ns.routes = routes
		desired[key] = ns
	}

	w.mu.Lock()
	defer w.mu.Unlock()
	w.desired = desired
	for key, ns := range desired {
		w.submitLocked(ctx, key, &target{path: ns.path, routes: ns.routes}, retry)
	}
	for key := range w.keys {
		if desired[key] == nil {
			w.submitLocked(ctx, key, nil, retry)
		}
	}
}

func boolCmp(a, b bool) int {
	switch {
	case a == b:
		return 0
	case a:
		return 1
	default:
		return -1
	}
}

func netnsPath(pid int) string { return "/proc/" + strconv.Itoa(pid) + "/ns/net" }

func short(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}
