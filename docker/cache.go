package docker

import (
	"errors"
	"log/slog"
	"maps"
	"os"
	"slices"
	"strings"
	"syscall"
	"time"

	dockerapi "github.com/fsouza/go-dockerclient"

	"github.com/connectable/connectable/netns"
)

// container is what the watcher keeps of one inspected container: the
// facts desired() needs, nothing decided yet. It is never modified once
// stored, so snapshots may share it.
type container struct {
	id      string
	name    string
	created time.Time
	pid     int
	mode    string // HostConfig.NetworkMode: "bridge", "host", "none", "container:<ref>", ...
	owner   string // for container:<ref>, the full ID of that container (the ref if it could not be inspected)
	netIno  uint64 // inode of its network namespace, 0 if unknown
	netns   string // where its network namespace was found, for status and logs (and for tests without a handle)
	routes  map[uint16]string
	labeled bool // has connect.* labels, valid or not
	// ns is its network namespace, opened and verified once when the
	// container (this process of it) was first seen; the cache holds one
	// reference, dropped when the entry goes. nil with nsErr when it could
	// not be opened or verified; nil without (tests' fake engine): Path.
	ns    *netns.Handle
	nsErr error
}

// drop releases what c holds.
func (c *container) drop() {
	if c != nil && c.ns != nil {
		c.ns.Release()
	}
}

// cache holds the running containers that matter: those with connect.*
// labels and those whose namespace one of them joined. Run's goroutine
// owns it.
type cache struct {
	log        *slog.Logger
	containers map[string]*container
	warned     map[string]map[string]bool // container ID → what was logged about it
}

func newCache(log *slog.Logger) cache {
	return cache{log: log, containers: make(map[string]*container), warned: make(map[string]map[string]bool)}
}

func (c *cache) len() int                 { return len(c.containers) }
func (c *cache) known(id string) bool     { return c.containers[id] != nil || c.referenced(id) }
func (c *cache) ids() []string            { return slices.Collect(maps.Keys(c.containers)) }
func (c *cache) forget(id string)         { c.containers[id].drop(); delete(c.containers, id) }
func (c *cache) dropWarningsOf(id string) { delete(c.warned, id) }

// snapshot returns the kept containers; they are never modified.
func (c *cache) snapshot() []*container { return slices.Collect(maps.Values(c.containers)) }

// dropWarnings forgets what was logged about containers that no longer run,
// so that their IDs do not pile up.
func (c *cache) dropWarnings(running func(id string) bool) {
	for id := range c.warned {
		if !running(id) {
			delete(c.warned, id)
		}
	}
}

// referenced reports whether a kept container joined id's namespace.
func (c *cache) referenced(id string) bool {
	for _, m := range c.containers {
		if m.owner == id && m.id != id {
			return true
		}
	}
	return false
}

// prune drops owners kept only for containers that are gone.
func (c *cache) prune() {
	for {
		dropped := false
		for id, m := range c.containers {
			if !m.labeled && !c.referenced(id) {
				m.drop()
				delete(c.containers, id)
				dropped = true
			}
		}
		if !dropped {
			return
		}
	}
}

// clear drops every entry, releasing what they hold.
func (c *cache) clear() {
	for id := range c.containers {
		c.forget(id)
	}
}

// observe records an inspected container: kept if it runs and either asks
// for routes or owns the namespace of one that does, forgotten otherwise.
// owner is the full ID of the container it joined, if any. o is the
// namespace the inspection opened for it; observe takes its reference, and
// keeps the one already cached for the same process instead: a namespace
// is opened once per process seen, and never reopened by its path for an
// operation.
func (w *Watcher) observe(dc *dockerapi.Container, owner string, o opened) {
	c := &w.cache
	kept := false
	defer func() {
		if !kept && o.h != nil {
			o.h.Release()
		}
	}()
	id, name := dc.ID, strings.TrimPrefix(dc.Name, "/")
	if !dc.State.Running || dc.State.Pid == 0 {
		w.log.Debug("container not running", "container", name, "id", short(id))
		c.forget(id)
		c.dropWarningsOf(id)
		return
	}
	if isSelf(w.cfg.SelfID, id) {
		c.forget(id)
		return
	}
	var labels map[string]string
	if dc.Config != nil {
		labels = dc.Config.Labels
	}
	labeled := hasRouteLabels(labels)
	if !labeled && !c.referenced(id) {
		c.forget(id)
		return
	}
	routes, errs := ParseRoutes(labels, w.cfg.Validate)
	for _, err := range errs {
		var le *LabelError
		if errors.As(err, &le) {
			c.warnOnce(id, "label:"+le.Label, "skipping label", "container", name, "id", short(id),
				"label", le.Label, "value", le.Value, "err", le.Err)
		}
	}
	ct := &container{
		id:      id,
		name:    name,
		created: dc.Created,
		pid:     dc.State.Pid,
		routes:  routes,
		labeled: labeled,
	}
	if dc.HostConfig != nil {
		ct.mode = dc.HostConfig.NetworkMode
	}
	if _, shared := ownerRef(dc); shared {
		ct.owner = owner
	}
	old := c.containers[id]
	// The same process: keep the namespace opened first, unless this
	// inspection verified another (a restart that drew the same PID).
	reuse := old != nil && old.pid == ct.pid && old.ns != nil && (o.h == nil || o.h.Inode() == old.ns.Inode())
	switch {
	case reuse:
		ct.ns = old.ns
	case o.h != nil:
		ct.ns, kept = o.h, true
	default:
		ct.nsErr = o.err
	}
	if ct.ns != nil {
		ct.netIno = ct.ns.Inode()
	} else {
		ct.netIno = w.nsInode(dc.State.Pid)
	}
	ct.netns = netnsPath(ct.pid)
	// Podman's --network ns:<path> joins a namespace that outlives the
	// container. Without a handle (the fake engine of tests) it is entered
	// at that path, so that its rules can still be cleared once the
	// container is gone; with one, the handle keeps it reachable anyway and
	// the path only names it. Either way only while the path holds the very
	// namespace the container's process is in.
	if p, ok := strings.CutPrefix(ct.mode, "ns:"); ok && ct.netIno != 0 && pathInode(p) == ct.netIno {
		ct.netns = p
	}
	if !reuse {
		old.drop()
	}
	c.containers[id] = ct
}

// warnOnce logs msg the first time it is said about what for container id.
// Warnings stay until the container stops, so one that keeps running in
// host mode is not warned about at every resync.
func (c *cache) warnOnce(id, what, msg string, args ...any) {
	seen := c.warned[id]
	if seen == nil {
		seen = make(map[string]bool)
		c.warned[id] = seen
	}
	if seen[what] {
		return
	}
	seen[what] = true
	c.log.Warn(msg, args...)
}

func isSelf(self, id string) bool {
	return self != "" && (id == self || (len(self) >= 12 && strings.HasPrefix(id, self)))
}

// netnsInode identifies pid's network namespace, or returns 0 when /proc
// does not show that process (e.g. a containerised daemon without
// --pid=host).
func netnsInode(pid int) uint64 { return pathInode(netnsPath(pid)) }

func pathInode(path string) uint64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Ino
	}
	return 0
}
