// Package docker owns connectable's view of the Docker Engine: the engine
// session (events, with re-subscription and resync), the inspection of
// containers, and the cache of what is true of each running container that
// matters. From that cache it computes the desired state of every network
// namespace (desired.go) and hands it, whole, to a Sink; it never touches a
// namespace itself and never waits for one to be set up.
//
// Files: docker.go (the session: events, resyncs), inspect.go (inspections
// off the event path, with bounded concurrency), cache.go (the container
// cache), desired.go (containers → desired state, a pure function),
// labels.go (connect.<port> labels), engine.go (the client's quirks),
// self.go (the daemon's own container), ports.go (published ports →
// the containers' own addresses, for a data path that skips the NAT),
// prestart.go (containers set up before their process runs, for the OCI
// hook).
//
// A namespace is named by a key, the ID of the container that owns it (for
// --network container:<id>, the container named there), and opened once, as
// a netns.Handle, through the owner's main process when the watcher first
// sees it (nsopen.go: pinned by a pidfd, checked against the engine's
// SandboxKey or a second inspection), so that a reused PID never leads a
// set-up or a teardown into another namespace. The cache holds one
// reference per container process, the Sink takes its own in Desire. Containers in host network
// mode are never set up: rules there would capture the host's own traffic.
//
// Typical usage:
//
//	client, err := docker.NewClient("") // DOCKER_HOST etc.
//	if err != nil {
//		return err
//	}
//	w := docker.NewWatcher(docker.Config{
//		Client: client,
//		Sink:   rec, // e.g. *reconcile.Reconciler
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
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	dockerapi "github.com/fsouza/go-dockerclient"

	"github.com/connectable/connectable/internal/backoff"
	"github.com/connectable/connectable/netns"
	"github.com/connectable/connectable/reconcile"
)

// Sink receives the desired state of every namespace, whole, each time it
// may have changed. Desire must not block on setting anything up.
type Sink interface {
	Desire(namespaces []Namespace)
}

// Namespace is the desired state of one network namespace.
type Namespace = reconcile.Namespace

// Container names one container of a Namespace.
type Container = reconcile.Container

// Config configures a Watcher. Client and Sink are required.
type Config struct {
	// Client talks to the engine; see NewClient.
	Client *dockerapi.Client
	// Sink receives the namespaces' desired state.
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
	// Ports optionally names a PortTable to invalidate on every container
	// lifecycle event, whatever the container's labels; if nil, none.
	Ports *PortTable
	// Listed is optionally called, on Run's goroutine, each time the
	// state a full listing gives (every container then running,
	// inspected) has been handed to the Sink, or was unchanged: the Sink
	// then knows its whole truth.
	Listed func()
}

// NewClient returns a client for the engine at host (e.g.
// unix:///run/podman/podman.sock or tcp://10.0.0.1:2376) or, if host is
// empty, at DOCKER_HOST, else at the local socket unix:///var/run/docker.sock.
// The rest is configured as Docker users expect: TLS from DOCKER_TLS_VERIFY
// and DOCKER_CERT_PATH, the API version from DOCKER_API_VERSION.
func NewClient(host string) (*dockerapi.Client, error) {
	host = cmp.Or(host, os.Getenv("DOCKER_HOST"), "unix:///var/run/docker.sock")
	version := os.Getenv("DOCKER_API_VERSION")
	var (
		c   *dockerapi.Client
		err error
	)
	if os.Getenv("DOCKER_TLS_VERIFY") != "" {
		certs := os.Getenv("DOCKER_CERT_PATH")
		if certs == "" {
			home, herr := os.UserHomeDir()
			if herr != nil {
				return nil, fmt.Errorf("DOCKER_TLS_VERIFY is set but neither DOCKER_CERT_PATH nor a home directory is: %w", herr)
			}
			certs = filepath.Join(home, ".docker")
		}
		c, err = dockerapi.NewVersionedTLSClient(host, filepath.Join(certs, "cert.pem"),
			filepath.Join(certs, "key.pem"), filepath.Join(certs, "ca.pem"), version)
	} else {
		c, err = dockerapi.NewVersionedClient(host, version)
	}
	if err != nil {
		return nil, fmt.Errorf("creating docker client for %s: %w", host, err)
	}
	// Without a pinned version the client speaks the engine's.
	c.SkipServerVersionCheck = version == ""
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
	inspectors     = 8               // inspections in flight at once
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
	// openNS opens and verifies a running container's network namespace
	// (openNamespace); the fake engine's tests replace it, their PIDs
	// being nobody's.
	openNS func(ctx context.Context, c *dockerapi.Container) (*netns.Handle, error)

	running atomic.Bool
	healthy atomic.Bool
	stats   struct {
		subscriptions, resyncs, resyncErrors atomic.Uint64
	}

	// Owned by Run's goroutine.
	cache   cache
	lost    bool // the event stream is down and that was logged
	started bool // the stream was up once
	sent    []Namespace

	// mu guards view, the desired state last handed to the Sink.
	mu   sync.Mutex
	view []Namespace

	pre prestartState // containers before their start, for hooks (prestart.go)
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
		cfg:       cfg,
		eng:       eng,
		log:       cfg.Logger,
		resyncIv:  cfg.ResyncInterval,
		backoff:   [2]time.Duration{minBackoff, maxBackoff},
		nsInode:   netnsInode,
		forbidden: make(map[uint64]bool),
	}
	w.openNS = w.openNamespace
	w.pre.init()
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
	w.cache = newCache(w.log)
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

// Namespaces returns the desired state last handed to the Sink, sorted by
// key. The result is a copy.
func (w *Watcher) Namespaces() []Namespace {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.view)
}

// Run follows the engine until ctx ends and returns nil. It subscribes to
// events before listing containers, so nothing that happens during the
// listing is missed, and subscribes again, with backoff, whenever the event
// stream ends. Run may be called once at a time.
func (w *Watcher) Run(ctx context.Context) error {
	if w.eng == nil || w.cfg.Sink == nil {
		return errors.New("docker: watcher needs a Client and a Sink")
	}
	if !w.running.CompareAndSwap(false, true) {
		return errors.New("docker: watcher is already running")
	}
	defer w.running.Store(false)
	defer w.healthy.Store(false)
	// The namespaces the cache holds are released with it: the Sink holds
	// its own references to those it set up. The next Run starts over.
	defer func() {
		w.cache.clear()
		w.sent = nil
	}()

	retry := backoff.Backoff{Min: w.backoff[0], Max: w.backoff[1]}
	for {
		upFor, err := w.session(ctx)
		w.healthy.Store(false)
		if ctx.Err() != nil {
			return nil
		}
		if upFor >= stableAfter {
			retry.Reset()
		}
		wait := retry.Next()
		if !w.lost {
			w.lost = true
			if w.started {
				w.log.Warn("docker event stream lost; reconnecting", "err", err)
			} else {
				w.log.Warn("docker engine unreachable; retrying", "err", err)
			}
		} else {
			w.log.Debug("docker event stream still down", "err", err, "retry_in", wait)
		}
		if !sleep(ctx, wait) {
			return nil
		}
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

// session subscribes, resyncs and follows events until the stream ends or ctx
// does, and says how long the stream was up. Every goroutine it starts
// (inspections, listings) has ended when it returns.
func (w *Watcher) session(ctx context.Context) (time.Duration, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ch := make(chan *dockerapi.APIEvents, eventBuffer)
	opts := dockerapi.EventsOptions{
		// The library connects in the background after returning, so the
		// stream may start after the listing below: replaying from a bit
		// before now closes that gap (events are only hints, so one seen
		// twice costs one inspect).
		Since: strconv.FormatInt(time.Now().Add(-sinceSlack).Unix(), 10),
		Filters: map[string][]string{
			"type":  {"container"},
			"event": slices.Concat(lifecycleEvents, []string{"create"}), // create: for hooks (prestart.go)
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
	ins := newInspector(w, ctx)
	// Cancelled first: an inspection of a container that is starting
	// waits for the start, which may wait for a hook this watcher serves.
	defer func() { cancel(); ins.wait() }()

	// The first resync completes before events are followed, so the state
	// handed over first is the engine's whole truth; events are held
	// meanwhile. Hooks are served all the while: Podman's listing waits
	// for the containers that are starting, whose hooks wait for this
	// goroutine; their create events are noted as they come.
	var held []*dockerapi.APIEvents
	listed := make(chan listing, 1)
	seq := ins.next()
	go func() { listed <- w.list(ctx, seq) }() // received below on every path
	var first listing
	for waiting := true; waiting; {
		select {
		case first = <-listed:
			waiting = false
		case m := <-w.pre.msgs:
			w.handlePrestart(m, ins)
		case ev, ok := <-ch:
			if !ok {
				cancel() // ends the listing, which may wait on a start
				<-listed
				return 0, errStreamEnded
			}
			w.noteEvent(ev)
			held = append(held, ev)
		}
	}
	if err := w.applyList(ins, first); err != nil {
		return 0, err
	}
	for ins.busy() {
		select {
		case r := <-ins.results:
			w.apply(ins.take(r), ins)
		case m := <-w.pre.msgs:
			w.handlePrestart(m, ins)
		case ev, ok := <-ch:
			if !ok {
				return 0, errStreamEnded
			}
			w.noteEvent(ev)
			held = append(held, ev)
		}
	}
	for _, ev := range held {
		w.takeEvent(ev, ins)
	}
	w.publish()
	if w.cfg.Listed != nil {
		w.cfg.Listed()
	}
	waitList := w.startListAll(ctx) // for hooks; off this goroutine, which serves them
	defer func() { cancel(); waitList() }()
	w.healthy.Store(true)
	switch {
	case w.lost:
		w.log.Info("docker event stream back")
	case !w.started:
		w.log.Info("following docker events", "containers", w.cache.len())
	}
	w.lost, w.started = false, true
	up := time.Now()
	err := w.follow(ctx, ch, ins)
	return time.Since(up), err
}

// listing is one full list of running containers, taken at seq.
type listing struct {
	seq  uint64
	list []dockerapi.APIContainers
	err  error
}

func (w *Watcher) list(ctx context.Context, seq uint64) listing {
	w.stats.resyncs.Add(1)
	lctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	list, err := w.eng.ListContainers(dockerapi.ListContainersOptions{Context: lctx})
	if err != nil {
		w.stats.resyncErrors.Add(1)
		return listing{seq: seq, err: fmt.Errorf("listing containers: %w", err)}
	}
	return listing{seq: seq, list: list}
}

// follow handles events, inspection results and periodic resyncs until the
// stream ends or ctx does. Nothing here waits for the engine: listings and
// inspections run on their own goroutines and report back.
func (w *Watcher) follow(ctx context.Context, ch <-chan *dockerapi.APIEvents, ins *inspector) error {
	tick := time.NewTicker(w.resyncIv)
	defer tick.Stop()
	listed := make(chan listing, 1)
	var lister sync.WaitGroup
	defer lister.Wait() // ctx is cancelled by then: session's defer
	listing := false
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
			w.pre.prune()
			if listing {
				continue // the last one is still running: an engine that slow gains nothing from two
			}
			listing = true
			seq := ins.next()
			lister.Add(1)
			go func() {
				defer lister.Done()
				listed <- w.list(ctx, seq)
			}()
		case l := <-listed:
			listing = false
			if err := w.applyList(ins, l); err != nil {
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
			w.noteEvent(ev)
			w.takeEvent(ev, ins)
		case r := <-ins.results:
			w.apply(ins.take(r), ins)
		case m := <-w.pre.msgs:
			w.handlePrestart(m, ins)
		case l := <-w.pre.listed:
			w.applyListAll(l)
		}
		// Hand the state over once the results that are already in have
		// been taken: a burst of events then costs one computation.
		if len(ins.results) == 0 {
			w.publish()
		}
	}
}

// takeEvent acts on an event once its create, if it is one, is noted:
// the container it names is inspected again.
func (w *Watcher) takeEvent(ev *dockerapi.APIEvents, ins *inspector) {
	if w.cfg.Ports != nil && isLifecycle(ev) {
		w.cfg.Ports.Invalidate()
	}
	if id := w.eventID(ev); id != "" {
		ins.request(id)
	}
}

// eventID returns the container ev is about, if it may matter.
func (w *Watcher) eventID(ev *dockerapi.APIEvents) string {
	if !isLifecycle(ev) {
		return ""
	}
	id := cmp.Or(ev.Actor.ID, ev.ID)
	if id == "" {
		return ""
	}
	// The engine copies a container's labels into its events: a container
	// without connect.* labels matters only if it holds the namespace of
	// one that has them, and then it is known already.
	if attrs := ev.Actor.Attributes; len(attrs) > 0 && !hasRouteLabels(attrs) && !w.cache.known(id) {
		return ""
	}
	return id
}

// isLifecycle reports whether ev is a container's lifecycle event.
func isLifecycle(ev *dockerapi.APIEvents) bool {
	return ev != nil && (ev.Type == "" || ev.Type == "container") &&
		slices.Contains(lifecycleEvents, cmp.Or(ev.Action, ev.Status))
}

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

// applyList records what a full listing says: a container it does not show,
// and that no inspection since the listing began has seen, is gone; every
// container that may matter is inspected again.
func (w *Watcher) applyList(ins *inspector, l listing) error {
	if l.err != nil {
		return l.err
	}
	running := make(map[string]bool, len(l.list))
	for _, c := range l.list {
		running[c.ID] = true
	}
	for _, id := range w.cache.ids() {
		if !running[id] && !ins.seenSince(id, l.seq) && !w.admittedRecently(id) {
			w.cache.forget(id)
		}
	}
	w.cache.dropWarnings(func(id string) bool { return running[id] })
	for _, c := range l.list {
		if hasRouteLabels(c.Labels) || w.cache.known(c.ID) {
			ins.request(c.ID)
		}
	}
	w.cache.prune()
	return nil
}

// publish computes every namespace's desired state and hands it to the Sink
// if it changed, logging what the computation found wrong once per
// container.
func (w *Watcher) publish() {
	ns, problems := desired(w.cache.snapshot(), w.cfg.SelfID, w.forbidden)
	for _, p := range problems {
		w.cache.warnOnce(p.id, p.what, p.msg, p.args...)
	}
	if slices.EqualFunc(ns, w.sent, sameNamespace) {
		return
	}
	w.sent = ns
	w.mu.Lock()
	w.view = ns
	w.mu.Unlock()
	w.cfg.Sink.Desire(ns)
}

func netnsPath(pid int) string { return "/proc/" + strconv.Itoa(pid) + "/ns/net" }

func short(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}
