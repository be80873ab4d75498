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
//   - path.go: Path, a reconcile.Path. For each namespace and labelled port
//     it resolves the service, applies the operator's target policy,
//     translates ports published by this engine to their containers'
//     addresses, and writes a table only if the namespace has a route to
//     every endpoint; otherwise the relay serves the port, and the log and
//     Status say why. It refreshes tables when answers expire, takes dead
//     endpoints out of every table on the kernel's report, and probes them
//     from a client namespace with the relay's back-off.
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
