package resolver

import (
	"math/rand/v2"
	"net/netip"
	"slices"
	"time"
)

// Answer is the structure of a value's current answer, for a caller that
// spreads connections itself rather than asking Lookup for an order per
// connection.
type Answer struct {
	Groups  []Group   // ascending priority; never empty on success
	Expires time.Time // the answer is fresh until then; ask again afterwards
	Stale   bool      // an expired answer, served because every server fails
}

// Group is the targets of one SRV priority.
type Group struct {
	Priority uint16
	Targets  []Target // those with a weight first, then those of weight 0
}

// Target is one SRV record's weight and its target's endpoints. For a
// host:port or ip:port value each address is a Target of weight 1.
type Target struct {
	Weight    uint32
	Endpoints []netip.AddrPort
}

// answer is one cached result for a label value. It is built once, when the
// cache is filled, and never modified afterwards: Lookup only reads it and
// returns shuffled copies, so any number of goroutines share it without
// locks.
type answer struct {
	groups []group // SRV priority groups, lowest priority first
	n      int     // endpoints in all groups
	err    error   // a cached negative answer (no such name, no endpoints) or failure; groups is empty

	expires    time.Time // fresh until then
	staleUntil time.Time // after expiry, may stand in for a failed refresh until then
	stale      bool      // this is an expired answer served because every server fails
}

// usableUntil returns the time after which a lookup can make no use of a:
// the end of its stale period, if it has one, else its expiry.
func (a *answer) usableUntil() time.Time {
	if a.err == nil && a.staleUntil.After(a.expires) {
		return a.staleUntil
	}
	return a.expires
}

// group is the targets of one SRV priority, prepared for the per-call
// weighted shuffle: targets with a weight come first, then those of weight 0.
type group struct {
	priority uint16
	targets  []target
	weighted int    // targets[:weighted] have weight > 0
	sum      uint32 // their total weight
	n        int    // endpoints in the group

	// flat holds the endpoints when every target has one and all weights
	// are equal (Consul's case): a weighted order is then a uniform one, so
	// a plain shuffle of a copy does, in linear time.
	flat []netip.AddrPort
}

// target is one SRV record (or, for host:port and ip:port, one address of
// weight 1) and the endpoints it stands for.
type target struct {
	weight    uint32
	endpoints []netip.AddrPort
}

// srvRecord is one usable SRV record with its target's addresses.
type srvRecord struct {
	priority, weight uint16
	endpoints        []netip.AddrPort
}

// newAnswer groups records by priority and prepares each group for
// shuffling. Records without endpoints are left out.
func newAnswer(recs []srvRecord) *answer {
	recs = slices.DeleteFunc(slices.Clone(recs), func(r srvRecord) bool { return len(r.endpoints) == 0 })
	// Stable, so the order of equals is the server's; the shuffle makes it
	// irrelevant, but reproducible structures help when debugging.
	slices.SortStableFunc(recs, func(a, b srvRecord) int {
		if a.priority != b.priority {
			return int(a.priority) - int(b.priority)
		}
		return boolInt(a.weight == 0) - boolInt(b.weight == 0)
	})
	a := &answer{}
	for i := 0; i < len(recs); {
		j := i
		g := group{priority: recs[i].priority}
		for ; j < len(recs) && recs[j].priority == recs[i].priority; j++ {
			t := target{weight: uint32(recs[j].weight), endpoints: recs[j].endpoints}
			if t.weight > 0 {
				g.weighted++
				g.sum += t.weight
			}
			g.n += len(t.endpoints)
			g.targets = append(g.targets, t)
		}
		g.flat = flatten(g.targets)
		a.groups = append(a.groups, g)
		a.n += g.n
		i = j
	}
	return a
}

// flatten returns the endpoints of targets if each has exactly one and all
// have the same weight, else nil.
func flatten(targets []target) []netip.AddrPort {
	flat := make([]netip.AddrPort, 0, len(targets))
	for _, t := range targets {
		if len(t.endpoints) != 1 || t.weight != targets[0].weight {
			return nil
		}
		flat = append(flat, t.endpoints[0])
	}
	return flat
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// endpoints returns a fresh copy of the endpoints in the order one new
// connection should try them: groups in ascending priority; inside a group,
// a weighted random order (RFC 2782) of the targets with a weight, then the
// targets of weight 0 in uniformly random order; the addresses of one
// target in random order. RFC 2782 gives weight-0 targets "a very small
// chance" of being picked first; here it is none while weighted ones remain.
func (a *answer) endpoints() []netip.AddrPort {
	out := make([]netip.AddrPort, 0, a.n)
	for i := range a.groups {
		out = a.groups[i].appendShuffled(out)
	}
	return out
}

// appendShuffled appends g's endpoints to out in a fresh random order.
func (g *group) appendShuffled(out []netip.AddrPort) []netip.AddrPort {
	if len(g.targets) == 1 {
		return appendTarget(out, &g.targets[0])
	}
	if g.flat != nil {
		start := len(out)
		out = append(out, g.flat...)
		shuffle(out[start:])
		return out
	}
	// The permutation lives on the stack for groups of ordinary size, so a
	// cached lookup allocates only its result.
	var buf [64]uint16
	var idx []uint16
	if len(g.targets) <= len(buf) {
		idx = buf[:len(g.targets)]
	} else {
		idx = make([]uint16, len(g.targets))
	}
	for i := range idx {
		idx[i] = uint16(i)
	}
	sum := g.sum
	for i := 0; i < g.weighted; i++ {
		// Pick target j from idx[i:weighted] with probability weight/sum.
		pick := i
		if g.weighted-i > 1 {
			x := rand.Uint32N(sum)
			var run uint32
			for j := i; j < g.weighted; j++ {
				run += g.targets[idx[j]].weight
				if run > x {
					pick = j
					break
				}
			}
		}
		idx[i], idx[pick] = idx[pick], idx[i]
		sum -= g.targets[idx[i]].weight
		out = appendTarget(out, &g.targets[idx[i]])
	}
	for i := g.weighted; i < len(idx); i++ {
		j := i + rand.IntN(len(idx)-i)
		idx[i], idx[j] = idx[j], idx[i]
		out = appendTarget(out, &g.targets[idx[i]])
	}
	return out
}

// appendTarget appends t's endpoints to out in random order.
func appendTarget(out []netip.AddrPort, t *target) []netip.AddrPort {
	start := len(out)
	out = append(out, t.endpoints...)
	shuffle(out[start:])
	return out
}

// shuffle puts s in uniformly random order (Fisher-Yates).
func shuffle(s []netip.AddrPort) {
	for i := len(s) - 1; i > 0; i-- {
		j := rand.IntN(i + 1)
		s[i], s[j] = s[j], s[i]
	}
}

// export returns a deep copy of a as an Answer, so callers cannot reach the
// shared cached slices. An Expires not after now (a stale answer handed to
// a caller while a refresh is in flight, or one that expired while the
// caller waited) becomes now+retry, so a caller following it neither spins
// nor waits out a long-gone TTL.
func (a *answer) export(now time.Time, retry time.Duration) Answer {
	out := Answer{Groups: make([]Group, len(a.groups)), Expires: a.expires, Stale: a.stale}
	if !out.Expires.After(now) {
		out.Expires = now.Add(retry)
	}
	// All endpoints share one allocation; each target's slice is capped,
	// so a caller appending to one cannot overwrite the next.
	eps := make([]netip.AddrPort, 0, a.n)
	for i := range a.groups {
		g := &a.groups[i]
		targets := make([]Target, len(g.targets))
		for j, t := range g.targets {
			start := len(eps)
			eps = append(eps, t.endpoints...)
			targets[j] = Target{Weight: t.weight, Endpoints: eps[start:len(eps):len(eps)]}
		}
		out.Groups[i] = Group{Priority: g.priority, Targets: targets}
	}
	return out
}
