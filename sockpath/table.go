package sockpath

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// candidate is one endpoint a table may choose, with the SRV priority and
// weight it came with.
type candidate struct {
	addr     netip.AddrPort // in the form written: translated where it was
	priority uint16
	target   int    // index of its SRV target in the answer; its weight is shared by the target's addresses
	weight   uint32 // the target's
	origin   netip.AddrPort
}

// signature names a candidate set, so that namespaces (and the two
// families of a port) choosing from the same endpoints of a service share
// one kernel table.
func signature(service string, cands []candidate) string {
	var b strings.Builder
	b.WriteString(service)
	for _, c := range cands {
		fmt.Fprintf(&b, "|%s/%d/%d/%d", c.addr, c.priority, c.target, c.weight)
	}
	return b.String()
}

// apportion returns the slot table of the best priority group that has a
// live endpoint: the endpoints it serves and, for each of the nslots slots,
// the index of an endpoint, in proportion to its weight. A target's weight
// is shared by its live addresses. Weight 0 targets are chosen only when no
// target of the group with a weight is live (RFC 2782 gives them "a very
// small chance"; the resolver orders them last for the same reason). ok is
// false when no endpoint is live; err is set when the group is larger than
// a table holds.
func apportion(cands []candidate, dead func(netip.AddrPort) bool) (eps []netip.AddrPort, slots []uint8, ok bool, err error) {
	var group []candidate
	for i := 0; i < len(cands); {
		j := i
		for j < len(cands) && cands[j].priority == cands[i].priority {
			j++
		}
		for _, c := range cands[i:j] {
			if !dead(c.addr) {
				group = append(group, c)
			}
		}
		if len(group) > 0 {
			break
		}
		i = j
	}
	if len(group) == 0 {
		return nil, nil, false, nil
	}
	if slices.ContainsFunc(group, func(c candidate) bool { return c.weight > 0 }) {
		group = slices.DeleteFunc(group, func(c candidate) bool { return c.weight == 0 })
	} else {
		for i := range group {
			group[i].weight = 1
		}
	}
	if len(group) > maxEndpoints {
		return nil, nil, false, fmt.Errorf("%d live endpoints in one priority group; a kernel table holds %d", len(group), maxEndpoints)
	}
	perTarget := map[int]int{}
	for _, c := range group {
		perTarget[c.target]++
	}
	share := make([]float64, len(group))
	var total float64
	for i, c := range group {
		share[i] = float64(c.weight) / float64(perTarget[c.target])
		total += share[i]
	}
	// Largest remainder, with at least one slot each: every live endpoint
	// can be chosen, and none is more than one slot off its share.
	counts := make([]int, len(group))
	type rem struct {
		i int
		r float64
	}
	rems := make([]rem, len(group))
	used := 0
	for i := range group {
		exact := share[i] / total * float64(nslots)
		counts[i] = max(1, int(exact))
		used += counts[i]
		rems[i] = rem{i, exact - float64(int(exact))}
	}
	slices.SortStableFunc(rems, func(a, b rem) int { return cmp.Compare(b.r, a.r) })
	for k := 0; used < nslots; k = (k + 1) % len(rems) {
		counts[rems[k].i]++
		used++
	}
	for used > nslots { // the minimum of one slot each overshot
		big := 0
		for i := range counts {
			if counts[i] > counts[big] {
				big = i
			}
		}
		counts[big]--
		used--
	}
	slots = make([]uint8, 0, nslots)
	for i, c := range group {
		eps = append(eps, c.addr)
		for range counts[i] {
			slots = append(slots, uint8(i))
		}
	}
	return eps, slots, true, nil
}

// kernelTable lays a slot table out for the kernel.
func kernelTable(service uint32, eps []netip.AddrPort, slots []uint8) *kernTable {
	t := &kernTable{Service: service}
	if len(eps) == 0 {
		return t
	}
	t.Nslots = uint32(nslots)
	t.Nendpoints = uint32(len(eps))
	copy(t.Slot[:], slots)
	for i, ep := range eps {
		t.Ep[i] = endpoint(ep)
	}
	return t
}
