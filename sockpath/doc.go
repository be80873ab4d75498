// Package sockpath owns connectable's second data path, the socket path:
// eBPF programs that send a labelled container's connect() to
// localhost:<port> straight to a live endpoint of the service, so that no
// proxy sits between the application and its backend. The relay (package
// proxy, with its REDIRECT rules) stays installed beneath: a connect the
// programs do not rewrite falls through to it, so every label works in every
// mode.
//
// In the kernel (bpf/sockpath.c), attached to the cgroup2 root:
//
//   - connect4 and connect6 rewrite TCP connects to 127.0.0.0/8,
//     ::ffff:127.0.0.0/104 and ::1 whose (network namespace cookie, family,
//     port) is in the routes map. The endpoint is drawn at random from the
//     route's table, whose 1024 slots the daemon apportions by SRV weight, so
//     a uniform draw is a weighted choice; endpoints that failed for the
//     same namespace are skipped, unless that would leave less than half of
//     the table (then that namespace's marks are ignored, as Envoy's panic
//     threshold does). A connect to ::1 is never sent to an IPv4 endpoint
//     (an IPV6_V6ONLY socket could not reach it): the relay serves it.
//     Every other connect, the host's among them, returns untouched, and a
//     connect not rewritten drops what an earlier one on the same socket
//     left in socket storage.
//   - getpeername4 and getpeername6 answer with the address the application
//     connected to, kept in socket storage.
//   - sockops watches the rewritten sockets only, and counts as evidence
//     against an endpoint only what the remote side caused: a reset or an
//     ICMP error in answer to the SYN (sk_err set before the socket closes),
//     or a SYN unanswered past its retransmission timeout. A socket the
//     application closed, aborted or gave up on while connecting is no
//     evidence. Evidence marks the endpoint dead for that namespace only,
//     keyed by (netns cookie, endpoint), and is reported through a ring
//     buffer within a per-namespace budget. A mark lapses after 30 s, so
//     that endpoints come back while no daemon runs. What was dropped or
//     ignored is counted in a stats map (Path.KernelStats).
//   - sockops also bounds how long the peer of a rewritten socket may stay
//     silent once it is established, as the relay bounds its backend
//     sockets: TCP_USER_TIMEOUT, and keepalive probes when idle, from the
//     silence map, which the daemon fills from --backend-timeout
//     (Kernel.SetSilenceBound; a negative bound, or none written, leaves
//     sockets alone). A connection to a host that vanished without a reset
//     then ends within the bound, rather than after 15 minutes of
//     retransmissions, or never when idle. What the application set before
//     its connect completed is kept: a TCP_USER_TIMEOUT of its own, or
//     SO_KEEPALIVE on (then all its keepalive settings); what it sets
//     afterwards replaces the bound's (Go's dialer, for one, sets its own
//     keepalive timings once connected, and keeps the user timeout).
//     Kernels before 6.1 cannot read those options from sockops: their
//     sockets are left alone, and counted (STAT_UNBOUNDED).
//
// In the daemon:
//
//   - kernel.go: Kernel loads the programs, adopting the maps and links that
//     a previous run pinned (so connects keep being served while no daemon
//     runs), and detaches and unpins everything on Remove; SetSilenceBound
//     writes the bound on established sockets.
//   - path.go: Path, a reconcile.Path. Apply records a namespace's routes
//     and returns at once: a port no longer labelled leaves the kernel
//     there and then, and the others are the relay's until decided, so the
//     relay beneath (the reconciler's next Path) waits for no lookup.
//   - refresh.go: each namespace has a worker of its own that decides each
//     of its services in a goroutine of its own, at first, when woken (a
//     new Apply, the engine's published ports changing), when the answer
//     expires (on the socket path) or on a back-off (on the relay), so that
//     one tenant's slow names delay neither its other ports nor another
//     tenant's decisions and refreshes.
//   - decide.go: deciding a service for a namespace: resolve it within a
//     deadline (5s; an answer of more than 64 endpoints stays on the
//     relay), apply the operator's target policy, translate a port
//     published by this engine to its container's address only for a
//     client on that container's network where containers may reach each
//     other (not a bridge with enable_icc=false), keep each family's table
//     to that family's endpoints (an IPv6 socket cannot be sent to a
//     v4-mapped one), and write into the table only the endpoints to which
//     a TCP connect from the namespace completes (reach.go): a route is
//     not reachability, since Docker drops what crosses between bridge
//     networks. The verdicts are kept per namespace and service, and
//     checked again after unverify (a namespace's failure report). With
//     no endpoint left, or one without a route, the relay serves the
//     port, and the log and Status say why.
//   - health.go, with package health: a namespace's evidence makes the
//     daemon probe the endpoint from its own network namespace (the
//     evidence the relay's dials give, which no tenant can influence);
//     only a failed probe takes the endpoint out of every table, and a
//     probe that reaches it again puts it back. Each namespace holds a
//     bounded number of endpoints under suspicion, and probes go round the
//     namespaces with a bound on each, off every lock, so that one
//     namespace's dead endpoints cannot delay another's revival.
//   - maps.go: the kernel's maps behind the Maps interface (a fake in the
//     tests), and the kernel's counts.
//   - table.go: the apportionment of slots: the best priority group with a
//     live endpoint, weights shared by a target's addresses, weight 0 only
//     when nothing weighted lives (RFC 2782).
//
// A table is replaced whole by swapping an inner map (the tables map is a
// hash of maps), so a connect sees the old set or the new one, never a mix.
//
// The programs are C, compiled by clang through bpf2go (gen.go), rather than
// built with cilium/ebpf's asm package: the weighted draw, the fallback scan
// and the socket-storage bookkeeping are a few dozen lines of C that read
// like the kernel's own documentation and that the verifier checks the same
// way, where hand-written instructions would be hundreds of lines that
// nobody could review. The compiled objects are committed, so building
// connectable needs no clang; `make lint` checks they match the source.
package sockpath
