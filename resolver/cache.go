package resolver

import (
	"sync"
	"time"
)

// DefaultCacheSize is the number of label values cached when
// Config.CacheSize is 0. An entry takes a few hundred bytes plus its
// endpoints, so the default bounds the cache to a few megabytes while
// leaving room for far more distinct services than one host runs.
const DefaultCacheSize = 10000

// cache maps label values to their entries and holds at most max of them.
// Label values are untrusted (any container can name as many distinct
// values as it likes), so both its size and the cost of an insertion are
// bounded: the hit path reads a sync.Map without taking a lock, an
// insertion costs O(1) amortised.
//
// When the cache is full, a new value takes the place of
//
//  1. a spent entry: nothing cached that a lookup could still use (an
//     answer past its expiry and its stale period, an expired negative
//     answer or failure) and no query in flight. When the cache fills, and
//     then at most once per max/4 insertions, a sweep drops all of them.
//  2. otherwise the entry the clock hand finds first that was not looked
//     up since the hand last passed it (CLOCK, the second-chance
//     approximation of least recently used).
//
// A value looked up once is therefore the first to go, and pushing out a
// value in use takes about max new values between two of its lookups,
// each a query to the DNS servers: a container that names many distinct
// values churns its own entries, not a busy service's.
type cache struct {
	m   sync.Map // label value → *entry
	max int

	mu    sync.Mutex // serialises insertions and evictions
	ring  []*entry   // the entries of m, in the order the hand visits them
	hand  int        // index in ring that the clock hand examines next
	added int        // insertions since the last sweep
}

// get returns the entry of value, or nil. It takes no lock.
func (c *cache) get(value string) *entry {
	v, ok := c.m.Load(value)
	if !ok {
		return nil
	}
	return v.(*entry)
}

// add returns the entry of e.key: the one already cached, or else e, which
// it inserts, evicting entries if the cache is full. It also returns the
// number of entries evicted.
func (c *cache) add(e *entry, now time.Time) (_ *entry, evicted int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if old := c.get(e.key); old != nil {
		return old, 0
	}
	if len(c.ring) >= c.max && c.added >= max(c.max/4, 1) {
		c.added = 0
		evicted = c.sweep(now)
	}
	c.added++
	c.m.Store(e.key, e)
	if len(c.ring) < c.max {
		c.ring = append(c.ring, e)
		return e, evicted
	}
	i := c.victim(now)
	c.m.Delete(c.ring[i].key)
	c.ring[i] = e
	return e, evicted + 1
}

// sweep drops every spent entry and returns how many there were.
func (c *cache) sweep(now time.Time) int {
	kept := c.ring[:0]
	for _, e := range c.ring {
		if e.spent(now) {
			c.m.Delete(e.key)
			continue
		}
		kept = append(kept, e)
	}
	n := len(c.ring) - len(kept)
	clear(c.ring[len(kept):]) // let the dropped entries be collected
	c.ring = kept
	c.hand = 0
	return n
}

// victim moves the clock hand to the entry to evict and returns its index
// in the full ring: the first spent entry, or the first one not looked up
// since the hand last passed it. Entries with a query in flight are passed
// over, so concurrent lookups of a new value keep sharing one query; if
// every entry is busy, two turns of the hand end at whichever is next.
func (c *cache) victim(now time.Time) int {
	for steps := 0; ; steps++ {
		i := c.hand
		c.hand = (c.hand + 1) % len(c.ring)
		e := c.ring[i]
		switch {
		case steps >= 2*len(c.ring), e.spent(now):
			return i
		case e.used.Load():
			e.used.Store(false) // a second chance, paid for by the lookup that set it
		case !e.busy():
			return i
		}
	}
}

// len returns the number of entries.
func (c *cache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.ring)
}

// markUsed records a lookup of e for the clock hand. It writes only when
// the mark is not yet set, so lookups of a busy value read a shared cache
// line instead of contending for it.
func (e *entry) markUsed() {
	if !e.used.Load() {
		e.used.Store(true)
	}
}

// spent reports whether e holds nothing that a lookup could still use and
// has no query in flight: evicting it costs nothing but the map slot.
func (e *entry) spent(now time.Time) bool {
	if a := e.ans.Load(); a != nil && now.Before(a.usableUntil()) {
		return false
	}
	return !e.busy()
}

// busy reports whether a query for e is in flight.
func (e *entry) busy() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.call != nil
}
