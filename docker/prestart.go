package docker

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	dockerapi "github.com/fsouza/go-dockerclient"
	"golang.org/x/sys/unix"

	"github.com/connectable/connectable/netns"
)

// Set-up before a container's process runs (the OCI hook, issue 20).
//
// The runtime runs connectable's hook after the engine has set up the
// container's network namespace and before its process starts, and the
// engine holds the container for the whole start: an inspection of it from
// the hook's request would wait for the start, which waits for the hook. So
// nothing here asks the engine about the container being started. What the
// watcher knows comes earlier: the create event carries the container's
// labels and name, a listing at the start of every session covers the
// containers created before it, and every inspection refreshes it. The
// hook's request brings the process: its namespace is opened through a
// pidfd, like every other, and checked against the container's identity
// (its cgroup names the container's ID) instead of the engine's, which
// would be an inspection.
//
// An admitted container enters the cache as if an inspection had shown it
// running with that PID and namespace, so the desired state the Sink gets
// is the one the start event's inspection computes again later: that
// inspection keeps the namespace opened first when it is the same one, and
// nothing is set up twice.

// record is what the watcher knows of a container that exists, running or
// not, before anything is asked of the engine.
type record struct {
	labels  map[string]string // its connect.* labels; nil: none
	name    string
	mode    string // network mode, "" until an inspection showed it
	created time.Time
}

// maxRecords bounds the containers the watcher remembers for hooks; beyond
// it, the records of unlabelled containers are dropped first, and a hook for
// a container it forgot waits for nothing it lacks: it is answered at once.
const maxRecords = 100000

// prestartState is the watcher's part of the hooks, owned by Run's
// goroutine except for msgs.
type prestartState struct {
	msgs    chan prestartMsg
	records map[string]*record
	waiting map[string][]prestartMsg // lookups for containers not known yet
	// admitted holds when each container was admitted, until an
	// inspection has shown it since: a listing does not show a container
	// whose start is still going on, and must not forget it meanwhile.
	admitted  map[string]time.Time
	listedAll bool            // records hold a full listing
	listed    chan allListing // startListAll's result, to Run's goroutine
}

// prestartMsg is one request from a hook's handler to Run's goroutine.
type prestartMsg struct {
	ctx   context.Context
	kind  int // msgLookup, msgAdmit, msgDone
	id    string
	pid   int
	join  bool
	h     *netns.Handle
	reply chan prestartReply // capacity 1: Run's goroutine never waits on it
}

const (
	msgLookup = iota
	msgAdmit
	msgDone
)

type prestartReply struct {
	rec    *record
	res    PrestartResult
	reason string
}

func (p *prestartState) init() {
	if p.msgs == nil {
		p.msgs = make(chan prestartMsg)
		p.records = make(map[string]*record)
		p.waiting = make(map[string][]prestartMsg)
		p.admitted = make(map[string]time.Time)
		p.listed = make(chan allListing, 1)
	}
}

// PrestartRequest is a container about to start, as its runtime's hook
// reports it.
type PrestartRequest struct {
	// ID is the container's full ID, PID its first process (the OCI
	// state's id and pid).
	ID  string
	PID int
	// Joined says the runtime joins an existing network namespace rather
	// than making one (the OCI configuration gives the namespace a path):
	// a namespace the watcher does not know already is then left to the
	// start event, since whose it is cannot be told before.
	Joined bool
	// Prepare optionally runs once the namespace is opened and checked,
	// before it is handed to the Sink; if it fails, nothing is set up.
	Prepare func(h *netns.Handle) error
}

// PrestartResult says what Prestart did.
type PrestartResult struct {
	// Labeled reports whether the container has connect.* labels.
	Labeled bool
	// Key and NetNS name the namespace handed to the Sink, to wait for
	// (reconcile.Reconciler.WaitApplied); Key is "" when nothing was.
	Key   string
	NetNS *netns.Handle
	// Reason says, when Key is "", why nothing was set up.
	Reason string
}

// errNotFollowing is returned by Prestart while no session follows the
// engine's events.
var errNotFollowing = errors.New("the watcher is not following the engine")

// Prestart hands the container req names to the Sink before its process
// runs, if its labels ask for routes, and returns the namespace to wait
// for. It never asks the engine about the container: see the comment at
// the top of prestart.go. It waits for the container's create event (or a
// listing) within ctx, and returns ctx's error if neither comes. Call
// PrestartDone once the runtime has the answer.
func (w *Watcher) Prestart(ctx context.Context, req PrestartRequest) (PrestartResult, error) {
	if req.ID == "" || req.PID <= 0 {
		return PrestartResult{}, fmt.Errorf("container ID %q and PID %d: both are required", req.ID, req.PID)
	}
	rep, err := w.prestartCall(ctx, prestartMsg{kind: msgLookup, id: req.ID})
	if err != nil {
		return PrestartResult{}, err
	}
	if rep.rec == nil || rep.rec.labels == nil {
		return PrestartResult{Reason: cmp.Or(rep.reason, "no connect.* labels")}, nil
	}
	h, err := openForHook(req.ID, req.PID)
	if err != nil {
		if errors.Is(err, netns.ErrForbidden) {
			return PrestartResult{Labeled: true, Reason: "its network namespace is the host's"}, nil
		}
		return PrestartResult{Labeled: true}, err
	}
	if req.Prepare != nil {
		if err := req.Prepare(h); err != nil {
			h.Release()
			return PrestartResult{Labeled: true}, fmt.Errorf("preparing the namespace: %w", err)
		}
	}
	rep, err = w.prestartCall(ctx, prestartMsg{kind: msgAdmit, id: req.ID, pid: req.PID, join: req.Joined, h: h})
	if err != nil {
		// Not admitted: Run's goroutine never took the handle.
		h.Release()
		return PrestartResult{Labeled: true}, err
	}
	rep.res.Labeled = true
	return rep.res, nil
}

// PrestartDone tells the watcher the runtime has its answer for id: the
// container is inspected once its start is over (the inspection waits for
// it), so that one that did not start after all, and sends no event, is
// forgotten at once rather than at the next resync.
func (w *Watcher) PrestartDone(ctx context.Context, id string) {
	w.pre.init()
	select {
	case w.pre.msgs <- prestartMsg{kind: msgDone, id: id}:
	case <-ctx.Done(): // Run's goroutine is gone: the next session lists anew
	}
}

func (w *Watcher) prestartCall(ctx context.Context, m prestartMsg) (prestartReply, error) {
	w.pre.init()
	m.ctx = ctx
	m.reply = make(chan prestartReply, 1)
	select {
	case w.pre.msgs <- m:
	case <-ctx.Done():
		return prestartReply{}, fmt.Errorf("%w: %w", errNotFollowing, context.Cause(ctx))
	}
	select {
	case r := <-m.reply:
		return r, nil
	case <-ctx.Done():
		return prestartReply{}, fmt.Errorf("waiting for the container's create event: %w", context.Cause(ctx))
	}
}

// handlePrestart serves one message in Run's goroutine.
func (w *Watcher) handlePrestart(m prestartMsg, ins *inspector) {
	p := &w.pre
	switch m.kind {
	case msgDone:
		if p.records[m.id] != nil && p.records[m.id].labels != nil {
			ins.request(m.id)
		}
	case msgLookup:
		if r := p.records[m.id]; r != nil || p.listedAll && len(p.records) >= maxRecords {
			m.reply <- prestartReply{rec: r}
			return
		}
		p.waiting[m.id] = append(p.waiting[m.id], m)
	case msgAdmit:
		res, reason := w.admit(m, ins)
		if res.Key == "" {
			res.Reason = reason
		}
		m.reply <- prestartReply{res: res}
	}
}

// admit puts the container of m into the cache, running as m.pid in the
// namespace m.h (whose reference it takes or releases), publishes, and
// returns the namespace it landed in.
func (w *Watcher) admit(m prestartMsg, ins *inspector) (PrestartResult, string) {
	c := &w.cache
	r := w.pre.records[m.id]
	if r == nil || r.labels == nil {
		m.h.Release()
		return PrestartResult{}, "the container went while its namespace was opened"
	}
	owner, why := w.ownerForHook(m, r)
	if why != "" {
		m.h.Release()
		return PrestartResult{}, why
	}
	routes, errs := ParseRoutes(r.labels, w.cfg.Validate)
	for _, err := range errs {
		var le *LabelError
		if errors.As(err, &le) {
			c.warnOnce(m.id, "label:"+le.Label, "skipping label", "container", r.name, "id", short(m.id),
				"label", le.Label, "value", le.Value, "err", le.Err)
		}
	}
	ct := &container{
		id:      m.id,
		name:    r.name,
		created: r.created,
		pid:     m.pid,
		mode:    r.mode,
		owner:   owner,
		netIno:  m.h.Inode(),
		netns:   netnsPath(m.pid),
		routes:  routes,
		labeled: true,
		ns:      m.h,
	}
	if old := c.containers[m.id]; old != nil {
		if old.pid == m.pid && old.ns != nil && old.ns.Inode() == m.h.Inode() {
			// Seen running already (a late hook): keep what is set up.
			m.h.Release()
			ct.ns = old.ns
		} else {
			old.drop()
		}
	}
	c.containers[m.id] = ct
	w.pre.admitted[m.id] = time.Now()
	// An inspection started before now shows the container created, not
	// running: it must not undo this.
	ins.fresh(m.id, ins.next())
	w.publish()
	for _, ns := range w.sent {
		for _, member := range ns.Containers {
			if member.ID == short(m.id) {
				return PrestartResult{Key: ns.Key, NetNS: ns.NetNS}, ""
			}
		}
	}
	if len(routes) == 0 {
		return PrestartResult{}, "no valid connect.* labels (the log says why each was skipped)"
	}
	return PrestartResult{}, "its namespace is not to be set up (the log says why)"
}

// ownerForHook returns the container whose namespace the hook's container
// is in ("" for its own), or why it is left to the start event.
func (w *Watcher) ownerForHook(m prestartMsg, r *record) (owner, why string) {
	var same []*container
	for _, c := range w.cache.containers {
		if c.id != m.id && c.netIno == m.h.Inode() {
			same = append(same, c)
		}
	}
	ref, shared := strings.CutPrefix(r.mode, "container:")
	switch {
	case r.mode == "host":
		return "", "it is in host network mode"
	case shared:
		for _, c := range same {
			if c.id == ref || strings.HasPrefix(c.id, ref) || c.name == strings.TrimPrefix(ref, "/") {
				return c.id, ""
			}
		}
		return "", "it joins the namespace of a container not set up yet; it is set up at its start"
	case !m.join && len(same) == 0:
		return "", ""
	case m.join && len(same) > 0:
		// The engine says nothing yet of whose namespace it is; the
		// earliest container in it keys it, as desired() orders them.
		slices.SortFunc(same, func(a, b *container) int { return a.created.Compare(b.created) })
		return same[0].id, ""
	case m.join && r.mode != "":
		return "", "" // e.g. ns:<path>, a namespace nobody else is known in
	default:
		return "", "it joins a network namespace the watcher does not know yet; it is set up at its start"
	}
}

// openForHook opens the network namespace of pid, the first process of
// container id by its runtime's word, and checks that the process is the
// container's: its cgroup names the container's ID (Docker's and Podman's
// cgroup drivers all do), read while a pidfd pins the process. The engine
// is not asked: it would wait for the start the hook is part of.
func openForHook(id string, pid int) (*netns.Handle, error) {
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil, fmt.Errorf("opening process %d: %w", pid, err)
	}
	defer unix.Close(pidfd)
	cg, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cgroup")
	if err != nil {
		return nil, fmt.Errorf("reading the cgroup of process %d: %w", pid, err)
	}
	if len(id) < 64 || !bytes.Contains(cg, []byte(id)) {
		return nil, fmt.Errorf("process %d is not in a cgroup of container %s: %w", pid, short(id), errNotContainers)
	}
	h, err := namespaceOfPidfd(pidfd, pid)
	if err != nil {
		return nil, err
	}
	if !alive(pidfd) {
		h.Release()
		return nil, fmt.Errorf("process %d exited while its namespace was opened: %w", pid, errNotContainers)
	}
	return h, nil
}

// noteEvent records what a create event says of a container, and forgets a
// removed one.
func (w *Watcher) noteEvent(ev *dockerapi.APIEvents) {
	if ev == nil || (ev.Type != "" && ev.Type != "container") {
		return
	}
	id := cmp.Or(ev.Actor.ID, ev.ID)
	if id == "" {
		return
	}
	p := &w.pre
	switch cmp.Or(ev.Action, ev.Status) {
	case "create":
		at := time.Unix(0, ev.TimeNano)
		if ev.TimeNano == 0 {
			at = time.Unix(ev.Time, 0)
		}
		w.remember(id, ev.Actor.Attributes, ev.Actor.Attributes["name"], "", at)
	case "destroy", "remove":
		delete(p.records, id)
		p.answer(id, nil)
	}
}

// noteInspected refreshes the record of an inspected container.
func (w *Watcher) noteInspected(c *dockerapi.Container) {
	var labels map[string]string
	if c.Config != nil {
		labels = c.Config.Labels
	}
	mode := ""
	if c.HostConfig != nil {
		mode = c.HostConfig.NetworkMode
	}
	w.remember(c.ID, labels, strings.TrimPrefix(c.Name, "/"), mode, c.Created)
	delete(w.pre.admitted, c.ID)
}

// admitGrace bounds how long an admitted container is kept without an
// inspection showing it: the start it waits for ends right after its hook.
const admitGrace = time.Minute

// admittedRecently reports whether the container id was admitted by a hook
// and not inspected since: a listing that does not show it must keep it.
func (w *Watcher) admittedRecently(id string) bool {
	at, ok := w.pre.admitted[id]
	return ok && time.Since(at) < admitGrace
}

// noteGone forgets a container the engine does not know.
func (w *Watcher) noteGone(id string) {
	delete(w.pre.records, id)
	delete(w.pre.admitted, id)
	w.pre.answer(id, nil)
}

func (w *Watcher) remember(id string, labels map[string]string, name, mode string, created time.Time) {
	p := &w.pre
	p.init()
	r := &record{name: name, mode: mode, created: created}
	if old := p.records[id]; old != nil {
		r.mode = cmp.Or(mode, old.mode)
		r.name = cmp.Or(name, old.name)
	}
	if hasRouteLabels(labels) {
		r.labels = make(map[string]string)
		for k, v := range labels {
			if strings.HasPrefix(k, LabelPrefix) {
				r.labels[k] = v
			}
		}
	}
	if len(p.records) >= maxRecords && p.records[id] == nil {
		p.evict()
	}
	p.records[id] = r
	p.answer(id, r)
}

// evict drops the records of unlabelled containers, which cost a hook
// nothing to forget.
func (p *prestartState) evict() {
	for id, r := range p.records {
		if r.labels == nil {
			delete(p.records, id)
		}
	}
}

// answer replies to the lookups waiting for id.
func (p *prestartState) answer(id string, r *record) {
	for _, m := range p.waiting[id] {
		m.reply <- prestartReply{rec: r, reason: "the container was removed"}
	}
	delete(p.waiting, id)
}

// prune drops lookups whose hook gave up, and admissions past their grace.
func (p *prestartState) prune() {
	for id, at := range p.admitted {
		if time.Since(at) >= admitGrace {
			delete(p.admitted, id)
		}
	}
	for id, ms := range p.waiting {
		ms = slices.DeleteFunc(ms, func(m prestartMsg) bool { return m.ctx.Err() != nil })
		if len(ms) == 0 {
			delete(p.waiting, id)
		} else {
			p.waiting[id] = ms
		}
	}
}

// allListing is one listing of every container, created and stopped ones
// too.
type allListing struct {
	list []dockerapi.APIContainers
	err  error
}

// startListAll lists every container the engine has, off Run's goroutine
// (Podman's listing waits for containers that are starting, whose hooks
// Run's goroutine serves), for applyListAll; it returns what waits for
// the listing, to call once ctx is cancelled.
func (w *Watcher) startListAll(ctx context.Context) (wait func()) {
	select {
	case <-w.pre.listed: // a past session's, never applied
	default:
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		lctx, cancel := context.WithTimeout(ctx, callTimeout)
		defer cancel()
		list, err := w.eng.ListContainers(dockerapi.ListContainersOptions{All: true, Context: lctx})
		select {
		case w.pre.listed <- allListing{list: list, err: err}:
		case <-ctx.Done():
		}
	}()
	return func() { <-done }
}

// applyListAll records what a full listing says, so that a hook for a
// container created before this session, or started again, needs no event.
func (w *Watcher) applyListAll(l allListing) {
	if l.err != nil {
		w.log.Warn("listing all containers for hooks; they wait for create events", "err", l.err)
		return
	}
	p := &w.pre
	seen := make(map[string]bool, len(l.list))
	for _, c := range l.list {
		seen[c.ID] = true
		name := ""
		if len(c.Names) > 0 {
			name = strings.TrimPrefix(c.Names[0], "/")
		}
		old := p.records[c.ID]
		if old != nil && maps.Equal(old.labels, filterRouteLabels(c.Labels)) {
			continue
		}
		w.remember(c.ID, c.Labels, name, "", time.Unix(c.Created, 0))
	}
	// A container created while the listing ran has its record from its
	// create event: keep records younger than the listing's longest run.
	for id, r := range p.records {
		if !seen[id] && time.Since(r.created) > callTimeout {
			delete(p.records, id)
		}
	}
	p.listedAll = true
}

func filterRouteLabels(labels map[string]string) map[string]string {
	var out map[string]string
	for k, v := range labels {
		if strings.HasPrefix(k, LabelPrefix) {
			if out == nil {
				out = make(map[string]string)
			}
			out[k] = v
		}
	}
	return out
}
