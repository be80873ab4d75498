package docker

import (
	"cmp"
	"maps"
	"slices"
	"strconv"
	"strings"
)

// problem is something desired() left out, for the watcher to log once per
// container and kind.
type problem struct {
	id   string // the container it is about
	what string // its kind, the key of the once-per-container log
	msg  string
	args []any
}

// desired decides the state of every network namespace from the running
// containers the cache keeps (cs), and nothing else: it neither logs nor
// looks anything up. self is the daemon's own container ID ("" on the host);
// forbidden holds the inodes of namespaces never to set up (the host's and
// the daemon's own).
//
// The rules, in order:
//   - A container in host network mode is skipped: rules there would capture
//     the host's own traffic. So is one that joined a host-mode container or
//     the daemon's own.
//   - A container keys the namespace of the container it joined
//     (container:<id>, followed through chains); if that owner is not kept,
//     or is now in another namespace (it restarted), the container keys its
//     namespace itself.
//   - Within a namespace the owner's labels come first, then the other
//     containers' by creation time: the first claim of a port wins, later
//     claims of it are reported as conflicts.
//   - A namespace without routes, or whose inode is forbidden, or that could
//     not be opened and verified as its owner's, is left out. Its NetNS is
//     the owner's handle: one per namespace, whichever container joined it.
//
// The result is sorted by key.
func desired(cs []*container, self string, forbidden map[uint64]bool) ([]Namespace, []problem) {
	byID := make(map[string]*container, len(cs))
	for _, c := range cs {
		byID[c.id] = c
	}
	var problems []problem
	report := func(c *container, what, msg string, args ...any) {
		problems = append(problems, problem{id: c.id, what: what, msg: msg,
			args: append([]any{"container", c.name, "id", short(c.id)}, args...)})
	}

	groups := make(map[string][]*container)
	for _, c := range cs {
		if !c.labeled {
			continue // kept only as a namespace owner
		}
		if c.mode == "host" {
			report(c, "host", "skipping container in host network mode: rules there would capture the host's own traffic")
			continue
		}
		if c.owner != "" && isSelf(self, c.owner) {
			report(c, "self", "skipping container that shares this daemon's network namespace")
			continue
		}
		owner := namespaceOf(c, byID)
		if owner.mode == "host" {
			report(c, "host", "skipping container that joined a host-mode container: rules there would capture the host's own traffic",
				"owner", owner.name)
			continue
		}
		groups[owner.id] = append(groups[owner.id], c)
	}

	var out []Namespace
	for key, members := range groups {
		owner := byID[key]
		if !slices.Contains(members, owner) {
			// An unlabelled owner still comes first in the namespace.
			members = append(members, owner)
		}
		slices.SortFunc(members, func(a, b *container) int {
			if a.id == key || b.id == key {
				return boolCmp(b.id == key, a.id == key)
			}
			return cmp.Or(a.created.Compare(b.created), strings.Compare(a.id, b.id))
		})
		ns := Namespace{Key: key, Path: owner.netns, NetNS: owner.ns, Routes: make(map[uint16]string)}
		claimedBy := make(map[uint16]*container)
		for _, c := range members {
			ns.Containers = append(ns.Containers, Container{ID: short(c.id), Name: c.name})
			for _, port := range slices.Sorted(maps.Keys(c.routes)) {
				svc := c.routes[port]
				if have, ok := ns.Routes[port]; ok {
					if have != svc {
						label := LabelPrefix + strconv.Itoa(int(port))
						report(c, "conflict:"+label, "skipping label: another container in the network namespace claims the port",
							"label", label, "value", svc, "claimed_by", claimedBy[port].name, "service", have)
					}
					continue
				}
				ns.Routes[port] = svc
				claimedBy[port] = c
			}
		}
		if len(ns.Routes) == 0 {
			continue
		}
		if forbidden[owner.netIno] {
			report(owner, "hostns", "skipping namespace: it is the host's or this daemon's own")
			continue
		}
		if owner.ns == nil && owner.nsErr != nil {
			report(owner, "netns", "skipping namespace: it could not be opened as the container's", "err", owner.nsErr)
			continue
		}
		out = append(out, ns)
	}
	slices.SortFunc(out, func(a, b Namespace) int { return strings.Compare(a.Key, b.Key) })
	return out, problems
}

// namespaceOf returns the container whose ID keys c's namespace: its own, or
// that of the container it joined (following owners that joined another).
// A container whose owner stopped, or restarted into a new namespace, is
// still in the old one, alone: it then keys that namespace itself.
func namespaceOf(c *container, byID map[string]*container) *container {
	cur := c
	for range maxOwnerChains {
		if cur.owner == "" || cur.owner == cur.id {
			return cur
		}
		o := byID[cur.owner]
		if o == nil || (o.netIno != 0 && cur.netIno != 0 && o.netIno != cur.netIno) {
			return cur
		}
		cur = o
	}
	return cur
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

// sameNamespace reports whether a and b ask for the same thing and show the
// same members.
func sameNamespace(a, b Namespace) bool {
	return a.Key == b.Key && a.Path == b.Path && a.NetNS == b.NetNS && maps.Equal(a.Routes, b.Routes) && slices.Equal(a.Containers, b.Containers)
}
