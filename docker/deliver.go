package docker

import (
	"context"
	"maps"
	"os"
	"syscall"
)

// target is what one key should look like in the Sink; nil means absent.
type target struct {
	path   string
	routes map[uint16]string // never modified once built
}

func sameTarget(a, b *target) bool {
	if a == nil || b == nil {
		return a == b
	}
	return a.path == b.path && maps.Equal(a.routes, b.routes)
}

// keyState tracks the delivery of one key. At most one worker goroutine runs
// per key; it always delivers the latest want, so a burst of changes while a
// slow Apply runs costs one more call, not one per change.
type keyState struct {
	want    *target // desired now
	sent    *target // handed to the Sink last (maybe still in flight)
	err     error   // result of the last completed call
	pending bool    // want must be delivered
	running bool    // a worker owns this key
}

func (ks *keyState) idle() bool {
	return !ks.running && !ks.pending && ks.want == nil && ks.sent == nil && ks.err == nil
}

// submitLocked records t as key's desired state and starts a worker if it
// needs delivering. With retry, a key whose last call failed is delivered
// again even if unchanged. w.mu is held.
func (w *Watcher) submitLocked(ctx context.Context, key string, t *target, retry bool) {
	ks := w.keys[key]
	if ks == nil {
		if t == nil {
			return // never set up: nothing to remove
		}
		ks = &keyState{}
		w.keys[key] = ks
	}
	ks.want = t
	ks.pending = !sameTarget(t, ks.sent) || (retry && ks.err != nil && !ks.running)
	if ks.pending && !ks.running {
		ks.running = true
		w.workers.Add(1)
		go w.deliverKey(ctx, key, ks)
	} else if ks.idle() {
		delete(w.keys, key)
	}
}

// deliverKey calls the Sink for one key until nothing is pending, then exits:
// setting up one namespace never waits for another's.
func (w *Watcher) deliverKey(ctx context.Context, key string, ks *keyState) {
	defer w.workers.Done()
	for {
		w.mu.Lock()
		if !ks.pending || ctx.Err() != nil {
			ks.running = false
			if ks.idle() {
				delete(w.keys, key)
			}
			w.mu.Unlock()
			return
		}
		t := ks.want
		ks.pending, ks.sent = false, t
		w.mu.Unlock()

		var err error
		if t == nil {
			err = w.cfg.Sink.Remove(ctx, key)
		} else {
			err = w.cfg.Sink.Apply(ctx, key, t.path, t.routes)
		}
		switch {
		case err != nil && ctx.Err() == nil && t == nil:
			w.log.Error("removing namespace; retrying at the next resync", "key", short(key), "err", err)
		case err != nil && ctx.Err() == nil:
			w.log.Error("setting up namespace; retrying at the next resync", "key", short(key), "netns", t.path, "err", err)
		case err == nil && t == nil:
			w.log.Debug("namespace removed", "key", short(key))
		case err == nil:
			w.log.Debug("namespace set up", "key", short(key), "netns", t.path, "routes", len(t.routes))
		}
		w.mu.Lock()
		ks.err = err
		w.mu.Unlock()
	}
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
