package docker

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"

	dockerapi "github.com/fsouza/go-dockerclient"

	"github.com/connectable/connectable/netns"
)

// inspection is what one inspection found out about a container.
type inspection struct {
	id  string
	seq uint64 // when it was started: a later one is closer to the truth
	// cs holds the container, then the containers whose namespace it
	// joined (container:<id>), nearest first, as far as they could be
	// inspected.
	cs []*dockerapi.Container
	// ns holds, for each of cs, the network namespace opened for it; the
	// inspection owns the references until apply hands them on.
	ns   []opened
	gone bool  // the engine does not know id
	err  error // the inspection failed otherwise
}

// opened is a container's network namespace as an inspection opened it.
type opened struct {
	h   *netns.Handle // nil: not opened (err says why, if it matters)
	err error
}

// release drops the references r still owns.
func (r *inspection) release() {
	for i := range r.ns {
		if r.ns[i].h != nil {
			r.ns[i].h.Release()
			r.ns[i].h = nil
		}
	}
}

// inspector runs inspections off the event path, at most inspectors at
// once, and hands their results back to Run's goroutine, which owns every
// field but results. Each inspection carries a sequence number so that a
// slow one never overwrites what a later one (or a later listing) found.
type inspector struct {
	w       *Watcher
	ctx     context.Context
	results chan inspection // never blocks a sender: capacity ≥ in flight
	queue   []string
	queued  map[string]bool
	running int
	seq     uint64
	seen    map[string]uint64 // id → seq of the latest inspection applied
	wg      sync.WaitGroup
}

func newInspector(w *Watcher, ctx context.Context) *inspector {
	return &inspector{
		w:       w,
		ctx:     ctx,
		results: make(chan inspection, inspectors),
		queued:  make(map[string]bool),
		seen:    make(map[string]uint64),
	}
}

// next returns a new sequence number, for a listing.
func (in *inspector) next() uint64 {
	in.seq++
	return in.seq
}

// request asks for id to be inspected. A request for a container already
// waiting in the queue is that request: it has not started yet, so it will
// see at least as much.
func (in *inspector) request(id string) {
	if in.queued[id] {
		return
	}
	in.queued[id] = true
	in.queue = append(in.queue, id)
	in.dispatch()
}

func (in *inspector) dispatch() {
	for in.running < inspectors && len(in.queue) > 0 {
		id := in.queue[0]
		in.queue = in.queue[1:]
		delete(in.queued, id)
		in.running++
		in.wg.Add(1)
		go in.inspect(id, in.next())
	}
}

// busy reports whether inspections are queued or running.
func (in *inspector) busy() bool { return in.running > 0 || len(in.queue) > 0 }

// take accounts for a finished inspection and starts the next queued one.
func (in *inspector) take(r inspection) inspection {
	in.running--
	in.dispatch()
	if !in.busy() {
		// No inspection is in flight, so no stale result can arrive for a
		// container that is no longer kept: forget when it was seen.
		for id := range in.seen {
			if !in.w.cache.known(id) && id != r.id {
				delete(in.seen, id)
			}
		}
	}
	return r
}

// fresh reports whether what an inspection started at seq says of id is
// newer than what was applied, and if so records it as applied.
func (in *inspector) fresh(id string, seq uint64) bool {
	if in.seen[id] > seq {
		return false
	}
	in.seen[id] = seq
	return true
}

// seenSince reports whether an inspection started after seq was applied
// for id.
func (in *inspector) seenSince(id string, seq uint64) bool { return in.seen[id] > seq }

// wait waits for the inspections in flight, and releases what the results
// nobody will take hold.
func (in *inspector) wait() {
	in.wg.Wait()
	for {
		select {
		case r := <-in.results:
			r.release()
		default:
			return
		}
	}
}

// inspect inspects id and the chain of containers whose namespace it
// joined, and reports.
func (in *inspector) inspect(id string, seq uint64) {
	defer in.wg.Done()
	r := inspection{id: id, seq: seq}
	c, err := in.w.inspect(in.ctx, id)
	switch {
	case err != nil:
		if nsc := (*dockerapi.NoSuchContainer)(nil); errors.As(err, &nsc) {
			r.gone = true
		} else {
			r.err = err
		}
	default:
		r.cs = append(r.cs, c)
		for range maxOwnerChains {
			ref, shared := ownerRef(c)
			if !shared || !c.State.Running {
				break
			}
			oc, err := in.w.inspect(in.ctx, ref)
			if err != nil {
				in.w.log.Debug("inspecting namespace owner", "container", strings.TrimPrefix(c.Name, "/"), "owner", ref, "err", err)
				break
			}
			if oc.ID == c.ID {
				break
			}
			r.cs = append(r.cs, oc)
			c = oc
		}
		for _, c := range r.cs {
			r.ns = append(r.ns, in.w.open(in.ctx, c))
		}
	}
	in.results <- r
}

// open opens c's network namespace if it runs and is not in host mode (nor
// the daemon itself). A container that joined another's namespace is opened
// too: desired() decides whose handle a namespace uses, and keys a member by
// itself once its owner is gone. A namespace that is the host's, reached some
// other way, is refused by netns.FromFD.
func (w *Watcher) open(ctx context.Context, c *dockerapi.Container) opened {
	if !c.State.Running || c.State.Pid == 0 || isSelf(w.cfg.SelfID, c.ID) ||
		(c.HostConfig != nil && c.HostConfig.NetworkMode == "host") {
		return opened{}
	}
	h, err := w.openNS(ctx, c)
	if err != nil {
		return opened{err: err}
	}
	return opened{h: h}
}

// ownerRef returns the <ref> of a container:<ref> network mode.
func ownerRef(c *dockerapi.Container) (string, bool) {
	if c.HostConfig == nil {
		return "", false
	}
	ref, ok := strings.CutPrefix(c.HostConfig.NetworkMode, "container:")
	return ref, ok && ref != ""
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

// apply records what an inspection found, unless later news is in already.
func (w *Watcher) apply(r inspection, in *inspector) {
	switch {
	case r.gone:
		if in.fresh(r.id, r.seq) {
			w.log.Debug("container gone", "id", short(r.id))
			w.noteGone(r.id)
			w.cache.forget(r.id)
			w.cache.dropWarningsOf(r.id)
		}
	case r.err != nil:
		if in.ctx.Err() == nil {
			// The state stays as it was; the next resync looks again.
			w.log.Warn("inspecting container", "id", short(r.id), "err", r.err)
		}
	default:
		// The container first, so that the owners it references are kept
		// when they are observed next.
		defer r.release() // what observe did not take
		for i, c := range r.cs {
			if !in.fresh(c.ID, r.seq) {
				continue
			}
			w.noteInspected(c)
			// Keyed by the full ID of the owner where it could be
			// inspected, else by the reference the engine recorded.
			owner, _ := ownerRef(c)
			if i+1 < len(r.cs) {
				owner = r.cs[i+1].ID
			}
			o := r.ns[i]
			r.ns[i].h = nil // observe's now
			w.observe(c, owner, o)
		}
	}
}
