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
//     a uniform draw is a weighted choice; endpoints the kernel saw fail are
//     skipped. Every other connect, the host's among them, returns untouched.
//   - getpeername4 and getpeername6 answer with the address the application
//     connected to, kept in socket storage.
//   - sockops watches the rewritten sockets only: a connect that fails, or
//     whose SYN times out once, marks its endpoint dead at once and reports it
//     through a ring buffer.
//
// In the daemon:
//
//   - kernel.go: Kernel loads the programs, adopting the maps and links that
//     a previous run pinned (so connects keep being served while no daemon
//     runs), and detaches and unpins everything on Remove.
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
//     v4-mapped one), and write the table only if the namespace has a route
//     to every endpoint and a TCP connect from the namespace to each
//     completes (reach.go): a route is not reachability, since Docker
//     drops what crosses between bridge networks. The verdicts are kept
//     per namespace and service, and checked again after unverify.
//     Otherwise the relay serves the port, and the log and Status say why.
//   - health.go: takes dead endpoints out of every table on the kernel's
//     report, and probes them from a client namespace with the relay's
//     back-off.
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
