// Package iptables owns connectable's rules inside a network namespace.
//
// In the namespace's nat table it keeps one chain of its own, Chain, jumped
// to exactly once from OUTPUT, holding one rule per labelled port:
//
//	-A OUTPUT -j CONNECTABLE
//	-A CONNECTABLE -p tcp -m addrtype --dst-type LOCAL -m tcp --dport 6000 -m comment --comment connectable -j REDIRECT --to-ports P
//
// so that a connection from inside the namespace to any of its own addresses
// on port 6000 (127.0.0.1, ::1, its eth0 address) lands on connectable's
// listener at P.
//
// In the filter table it keeps a chain of the same name, jumped to exactly
// once from INPUT, that guards P while nothing listens there:
//
//	-A INPUT -j CONNECTABLE
//	-A CONNECTABLE -i lo -p tcp -m tcp --dport P --tcp-flags FIN,SYN,RST,ACK SYN -m socket --transparent --nowildcard -m comment --comment connectable -j RETURN
//	-A CONNECTABLE -i lo -p tcp -m tcp --dport P --tcp-flags FIN,SYN,RST,ACK SYN -m comment --comment connectable -j DROP
//
// The rules outlive the daemon, so that a restarted one (which finds P again
// through Port) serves the same ports without touching them; but between
// the old process's exit and the new one's listen, a redirected SYN finds
// nothing on P and the kernel would answer it with a RST: the application's
// connect would be refused. Dropped instead, the SYN is sent again by the
// client's kernel after 1 s, 3 s, ..., and the connect lands on the next
// daemon's listener. A SYN that finds the listener (-m socket, one marked
// IP_TRANSPARENT: see guardRules) passes as before. Kernels without the
// socket match get the nat rules only, with a warning.
//
// IPv4 rules go through iptables, IPv6 ones through ip6tables. Each table is
// read with one `iptables -t <table> -S` and written with iptables-restore
// --noflush: one program run per family, with a section per table that the
// kernel applies whole, so a namespace never sees a half-written chain.
// Every program runs from a thread inside the target namespace (netns.Do),
// since a child process inherits its thread's namespace.
//
// Typical usage:
//
//	nat, err := iptables.New(iptables.Config{Backend: "auto", Logger: logger})
//	...
//	h, err := netns.Open("/proc/1234/ns/net") // once, when the container is seen
//	err = nat.Apply(h.Name(), []uint16{6000, 8500}, proxyPort)
//	...
//	err = nat.Clear(h.Name())
//
// Every method takes the namespace as a path or, in the daemon, as the Name
// of a netns.Handle, which it enters through the Handle's descriptor.
package iptables

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	goiptables "github.com/coreos/go-iptables/iptables"

	"github.com/connectable/connectable/netns"
)

// lockWait is how long, in seconds, a legacy iptables program waits for the
// xtables lock that every legacy user on the host shares.
const lockWait = 10

// Config configures New.
type Config struct {
	// Backend selects the iptables binaries: "nft" (iptables-nft and
	// friends), "legacy" (iptables-legacy), or "auto" (also ""), which picks
	// the one that already holds rules in the host's network namespace, and
	// nft when both or neither do.
	Backend string
	// Logger optionally specifies where to log; if nil, slog.Default().
	Logger *slog.Logger
}

// tables runs one family's iptables programs. Tests swap in an in-memory
// fake.
type tables interface {
	// ListTable returns `iptables -t table -S`: the policies of the
	// built-in chains, the other chains (-N), then every rule (-A). One run
	// reads both a hook's jumps and Chain, which go-iptables, listing a
	// chain at a time, would need two for.
	ListTable(table string) ([]string, error)
	// Restore runs iptables-restore --noflush with input.
	Restore(input string) error
}

// NAT installs and removes connectable's REDIRECT rules in network
// namespaces. Its methods may be called concurrently for different
// namespaces; calls for one namespace must not overlap.
type NAT struct {
	backend string
	log     *slog.Logger
	v4, v6  tables // v6 is nil when this host has no usable ip6tables
	// do runs fn inside the namespace at path; netns.Do except in tests.
	do func(path string, fn func() error) error

	v6Warned atomic.Bool
	// noGuard is set once a restore showed the kernel lacks the socket
	// match: from then on only the nat part is read and written.
	noGuard atomic.Bool

	// reads holds what Port listed, by namespace path, for the Apply that
	// follows it on the same namespace; see Port.
	readsMu sync.Mutex
	reads   map[string]portRead
}

// portRead is one namespace's listings, as Port read them.
type portRead struct {
	at time.Time
	v4 family
	v6 *family // nil when Port did not list IPv6
}

// family is what one family's tables hold of ours.
type family struct {
	redirect state // nat
	guard    state // filter; zero when the guard is unavailable
}

// readReuse bounds how old Port's listings may be for Apply to trust them:
// long enough to open a listener in between, too short for a stale reading
// to outlive the container it came from.
const readReuse = time.Second

// maxReads bounds the listings kept for Applies to come: more set-ups than
// this at once only cost the surplus its reuse.
const maxReads = 256

// New resolves the backend once, logs the choice once and returns a NAT for
// it. It fails when the chosen backend's iptables programs are missing;
// missing ip6tables programs only disable IPv6 rules, with a warning.
func New(cfg Config) (*NAT, error) {
	n := &NAT{log: cfg.Logger, do: netns.Do}
	if n.log == nil {
		n.log = slog.Default()
	}
	n.log = n.log.With("component", "iptables")
	backend, err := normalizeBackend(cfg.Backend)
	if err != nil {
		return nil, err
	}
	hostNS := defaultHostNetNS
	if err := netns.Do(hostNS, func() error { return nil }); err != nil {
		n.log.Debug("using own network namespace for backend detection", "err", err)
		hostNS = ""
	}
	reason := "forced by configuration"
	if backend == "" {
		backend, reason = n.detect(hostNS)
	}
	n.backend = backend

	bins := binariesOf(backend)
	n.v4, err = n.newTables(hostNS, goiptables.ProtocolIPv4, bins.ip4, bins.restore4)
	if err != nil {
		return nil, fmt.Errorf("setting up %s backend: %w", backend, err)
	}
	n.v6, err = n.newTables(hostNS, goiptables.ProtocolIPv6, bins.ip6, bins.restore6)
	if err != nil {
		n.log.Warn("ipv6 rules disabled on this host", "backend", backend, "err", err)
		n.v6 = nil
	}
	n.log.Info("backend chosen", "backend", backend, "reason", reason)
	return n, nil
}

// newTables finds one family's programs and checks, through go-iptables
// (which runs `<binary> --version`), that the iptables one works, so a
// broken install fails New rather than every Apply. The answer does not
// depend on the namespace, but the check runs inside one like every other
// exec of this package.
func (n *NAT) newTables(hostNS string, proto goiptables.Protocol, bin, restore string) (tables, error) {
	binPath, err := lookPath(bin)
	if err != nil {
		return nil, err
	}
	restorePath, err := lookPath(restore)
	if err != nil {
		return nil, err
	}
	err = n.do(hostNS, func() error {
		_, err := goiptables.New(goiptables.IPFamily(proto), goiptables.Path(binPath), goiptables.Timeout(lockWait))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("running %s --version: %w", binPath, err)
	}
	return execTables{bin: binPath, restore: restorePath}, nil
}

// Backend returns the backend in use: "nft" or "legacy".
func (n *NAT) Backend() string { return n.backend }

// Apply makes the rules in the network namespace at netnsPath exactly one
// jump from nat OUTPUT to Chain and, in that Chain, one REDIRECT rule per
// port to toPort; and one jump from filter INPUT to Chain and, in that
// Chain, the two rules that guard toPort (see the package doc). It does so
// for IPv4 and, where the namespace's ip6tables nat table works, for IPv6.
// It converges from any start: no chain, stale rules, duplicated jumps,
// another toPort, the leftovers of a crashed run. A namespace already in
// the desired state costs two listings per family (one per table) and no
// write; anything else adds one iptables-restore per family. No ports at
// all means Clear.
//
// Where the kernel lacks the socket match the guard cannot be had: Apply
// then writes the nat part alone, logs that once per process, and succeeds.
func (n *NAT) Apply(netnsPath string, ports []uint16, toPort uint16) error {
	want, err := redirectRules(ports, toPort)
	if err != nil {
		return fmt.Errorf("applying redirect rules in %s: %w", netnsPath, err)
	}
	if len(want) == 0 {
		return n.Clear(netnsPath)
	}
	guard := guardRules(toPort)
	prev, havePrev := n.takeRead(netnsPath)
	st := prev.v4
	if !havePrev {
		if st, err = n.read(netnsPath, n.v4); err != nil {
			return fmt.Errorf("applying ipv4 redirect rules in %s: %w", netnsPath, err)
		}
	}
	if err := n.write(netnsPath, n.v4, st, want, guard); err != nil {
		return fmt.Errorf("applying ipv4 redirect rules in %s: %w", netnsPath, err)
	}
	if n.v6 == nil {
		return nil
	}
	if havePrev && prev.v6 != nil {
		st = *prev.v6
	} else if st, err = n.read(netnsPath, n.v6); err != nil {
		return n.v6Unusable(netnsPath, "applying ipv6 redirect rules", err)
	}
	if err := n.write(netnsPath, n.v6, st, want, guard); err != nil {
		return fmt.Errorf("applying ipv6 redirect rules in %s: %w", netnsPath, err)
	}
	return nil
}

// write turns one family's st into want in nat and guard in filter, in one
// iptables-restore run. The filter section comes first: the guard is then
// in place before anything is redirected to its port, and when it is the
// section that fails, nothing of the input was applied and the nat section
// alone can be tried again.
func (n *NAT) write(path string, t tables, st family, want, guard []string) error {
	nat := section{redirectPart.table, applyCommands(redirectPart, st.redirect, want)}
	if n.noGuard.Load() {
		return n.restore(path, t, nat)
	}
	filter := section{guardPart.table, applyCommands(guardPart, st.guard, guard)}
	err := n.restore(path, t, filter, nat)
	if err == nil || len(filter.lines) == 0 || !lacksSocketMatch(err) {
		return err
	}
	n.guardUnavailable(path, err)
	return n.restore(path, t, nat)
}

// lacksSocketMatch reports whether a failed restore names the socket match
// as the culprit: "Couldn't load match `socket'" where the userspace
// extension is missing, "Extension socket revision 0 not supported" (then,
// with nft, "RULE_APPEND failed (No such file or directory)") where the
// kernel lacks xt_socket.
func lacksSocketMatch(err error) bool {
	msg := err.Error()
	return strings.Contains(msg, "match `socket'") || strings.Contains(msg, "Extension socket ")
}

// guardUnavailable remembers that the kernel cannot run the guard and says
// so: once per process at warning level, later at debug level (Applies
// that were already under way when the first one found out).
func (n *NAT) guardUnavailable(path string, err error) {
	level := slog.LevelDebug
	if !n.noGuard.Swap(true) {
		level = slog.LevelWarn
	}
	n.log.Log(context.Background(), level,
		"kernel lacks the socket match (xt_socket), redirect rules only: connects during a daemon restart are refused instead of waiting for the next start",
		"netns", path, "err", err)
}

// Clear removes every jump to Chain and Chain itself, in nat and in filter,
// from the network namespace at netnsPath, both families. Nothing to remove
// is success.
//
// A namespace that no longer exists (its container is gone) took its rules
// with it, so that is success too; for a netns.Handle's name that means a
// released Handle, which is never entered: whatever its container's old
// /proc path names now is not touched.
func (n *NAT) Clear(netnsPath string) error {
	n.takeRead(netnsPath) // about to be outdated
	if err := n.clear(netnsPath, n.v4); err != nil {
		if netns.Gone(netnsPath) {
			n.log.Debug("namespace gone, nothing to clear", "netns", netnsPath)
			return nil
		}
		return fmt.Errorf("clearing ipv4 redirect rules in %s: %w", netnsPath, err)
	}
	if n.v6 == nil {
		return nil
	}
	if err := n.clear(netnsPath, n.v6); err != nil {
		if isListErr(err) {
			return n.v6Unusable(netnsPath, "clearing ipv6 redirect rules", err)
		}
		return fmt.Errorf("clearing ipv6 redirect rules in %s: %w", netnsPath, err)
	}
	return nil
}

// clear empties one family in one iptables-restore run, nat first: nothing
// is redirected to the guarded port any more by the time the guard goes.
func (n *NAT) clear(path string, t tables) error {
	st, err := n.read(path, t)
	if err != nil {
		return listErr{err}
	}
	return n.restore(path, t,
		section{redirectPart.table, clearCommands(redirectPart, st.redirect)},
		section{guardPart.table, clearCommands(guardPart, st.guard)})
}

// Port returns the port the existing rules in the network namespace at
// netnsPath redirect to, or 0 when there are none, so a restarted daemon can
// listen on the same port again and the rules of its previous run keep
// working in the meantime. IPv4 rules are asked first, then IPv6 ones.
//
// The first Apply to the same namespace within a second reuses what Port
// listed instead of listing again: Port therefore lists the filter table
// too, which it does not need itself, and a new namespace then costs up to
// four iptables runs fewer (BenchmarkSetUpOne against
// BenchmarkSetUpOneNoReuse). This is a contract: between Port and that
// Apply, nothing may change the namespace's rules, and only Clear (which
// drops the reading) may be called for it. The proxy keeps it by holding
// the namespace's lock across both; see proxy.Redirector. Readings of
// several namespaces are kept apart, so set-ups that interleave keep the
// saving.
func (n *NAT) Port(netnsPath string) (uint16, error) {
	st, err := n.read(netnsPath, n.v4)
	if err != nil {
		return 0, fmt.Errorf("reading ipv4 redirect rules in %s: %w", netnsPath, err)
	}
	r := portRead{v4: st}
	if p := st.redirect.port(); p != 0 || n.v6 == nil {
		n.keepRead(netnsPath, r)
		return p, nil
	}
	st6, err := n.read(netnsPath, n.v6)
	if err != nil {
		if ranAndFailed(err) {
			return 0, nil // no ip6tables nat here, so no rules either
		}
		return 0, fmt.Errorf("reading ipv6 redirect rules in %s: %w", netnsPath, err)
	}
	r.v6 = &st6
	n.keepRead(netnsPath, r)
	return st6.redirect.port(), nil
}

func (n *NAT) keepRead(path string, r portRead) {
	r.at = time.Now()
	n.readsMu.Lock()
	defer n.readsMu.Unlock()
	if n.reads == nil {
		n.reads = make(map[string]portRead)
	}
	if len(n.reads) >= maxReads {
		for p, old := range n.reads {
			if r.at.Sub(old.at) >= readReuse {
				delete(n.reads, p)
			}
		}
		if len(n.reads) >= maxReads {
			return
		}
	}
	n.reads[path] = r
}

// takeRead returns, once, Port's recent listings of netnsPath.
func (n *NAT) takeRead(netnsPath string) (portRead, bool) {
	n.readsMu.Lock()
	defer n.readsMu.Unlock()
	r, ok := n.reads[netnsPath]
	if !ok {
		return portRead{}, false
	}
	delete(n.reads, netnsPath)
	return r, time.Since(r.at) < readReuse
}

// read lists what one family holds of ours: one listing of the nat table
// and, unless the guard is known to be unavailable, one of the filter table.
func (n *NAT) read(path string, t tables) (family, error) {
	var st family
	var listing []string
	if err := n.do(path, func() (err error) {
		listing, err = t.ListTable(redirectPart.table)
		return err
	}); err != nil {
		return st, fmt.Errorf("listing table %s: %w", redirectPart.table, err)
	}
	st.redirect = parseTable(redirectPart, listing)
	if n.noGuard.Load() {
		return st, nil
	}
	if err := n.do(path, func() (err error) {
		listing, err = t.ListTable(guardPart.table)
		return err
	}); err != nil {
		return st, fmt.Errorf("listing table %s: %w", guardPart.table, err)
	}
	st.guard = parseTable(guardPart, listing)
	return st, nil
}

// restore runs one iptables-restore with the sections, or nothing when they
// hold no lines.
func (n *NAT) restore(path string, t tables, sections ...section) error {
	input := restoreInput(sections...)
	if input == "" {
		return nil
	}
	return n.do(path, func() error { return t.Restore(input) })
}

// v6Unusable decides what a failed ip6tables listing means. If ip6tables
// itself failed, the namespace (or the kernel) has no usable IPv6 nat table:
// that is logged once per process at warning level, later at debug level,
// and IPv4 carries on. Any other failure (the namespace vanished) is an
// error.
func (n *NAT) v6Unusable(path, doing string, err error) error {
	if !ranAndFailed(err) {
		return fmt.Errorf("%s in %s: %w", doing, path, err)
	}
	level := slog.LevelDebug
	if !n.v6Warned.Swap(true) {
		level = slog.LevelWarn
	}
	n.log.Log(context.Background(), level, "ipv6 nat table unusable, ipv4 rules only", "netns", path, "err", err)
	return nil
}

// ranAndFailed reports whether err comes from a program that ran and exited
// non-zero, rather than from entering the namespace or starting the
// program.
func ranAndFailed(err error) bool {
	if errors.As(err, new(*exec.ExitError)) {
		return true
	}
	var e interface{ ExitStatus() int } // the tests' fake
	return errors.As(err, &e)
}

// listErr marks a failure to read the state, as opposed to one writing it.
type listErr struct{ error }

func (e listErr) Unwrap() error { return e.error }

func isListErr(err error) bool { return errors.As(err, new(listErr)) }

// execTables is the real tables: the backend's iptables program for
// listings, the matching iptables-restore for writes.
type execTables struct {
	bin, restore string
}

func (t execTables) ListTable(table string) ([]string, error) {
	// --wait: legacy iptables takes the host-wide xtables lock to list too.
	cmd := exec.Command(t.bin, "--wait", strconv.Itoa(lockWait), "-t", table, "-S")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("running %s -t %s -S: %w: %s", t.bin, table, err, bytes.TrimSpace(stderr.Bytes()))
	}
	return strings.Split(strings.TrimSuffix(stdout.String(), "\n"), "\n"), nil
}

func (t execTables) Restore(input string) error {
	cmd := exec.Command(t.restore, "--noflush", "--wait", strconv.Itoa(lockWait))
	cmd.Stdin = strings.NewReader(input)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("running %s: %w: %s", t.restore, err, bytes.TrimSpace(stderr.Bytes()))
	}
	return nil
}
