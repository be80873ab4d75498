// Package iptables owns connectable's REDIRECT rules inside a network
// namespace.
//
// In the namespace's nat table it keeps one chain of its own, Chain, jumped
// to exactly once from OUTPUT, holding one rule per labelled port:
//
//	-A OUTPUT -j CONNECTABLE
//	-A CONNECTABLE -p tcp -m addrtype --dst-type LOCAL -m tcp --dport 6000 -m comment --comment connectable -j REDIRECT --to-ports P
//
// so that a connection from inside the namespace to any of its own addresses
// on port 6000 (127.0.0.1, ::1, its eth0 address) lands on connectable's
// listener at P. IPv4 rules go through iptables, IPv6 ones through ip6tables.
//
// The rules are written with iptables-restore --noflush, one transaction per
// family, so a namespace never sees a half-written chain; they are read with
// go-iptables. Every program runs from a thread inside the target namespace
// (netns.Do), since a child process inherits its thread's namespace.
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

// tables is the part of *goiptables.IPTables this package calls, plus
// Restore, which go-iptables lacks. Tests swap in an in-memory fake.
type tables interface {
	List(table, chain string) ([]string, error)
	ListChains(table string) ([]string, error)
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

	// reads holds what Port listed, by namespace path, for the Apply that
	// follows it on the same namespace; see Port.
	readsMu sync.Mutex
	reads   map[string]portRead
}

// portRead is one namespace's listings, as Port read them.
type portRead struct {
	at time.Time
	v4 state
	v6 *state // nil when Port did not list IPv6
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

// newTables builds the go-iptables handle for one family. go-iptables runs
// `<binary> --version` here; that answer does not depend on the namespace,
// but it runs inside one like every other exec of this package.
func (n *NAT) newTables(hostNS string, proto goiptables.Protocol, bin, restore string) (tables, error) {
	binPath, err := lookPath(bin)
	if err != nil {
		return nil, err
	}
	restorePath, err := lookPath(restore)
	if err != nil {
		return nil, err
	}
	var ipt *goiptables.IPTables
	err = n.do(hostNS, func() (err error) {
		ipt, err = goiptables.New(goiptables.IPFamily(proto), goiptables.Path(binPath), goiptables.Timeout(lockWait))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("running %s --version: %w", binPath, err)
	}
	return execTables{IPTables: ipt, restore: restorePath}, nil
}

// Backend returns the backend in use: "nft" or "legacy".
func (n *NAT) Backend() string { return n.backend }

// Apply makes the rules in the network namespace at netnsPath exactly one
// jump from OUTPUT to Chain and, in Chain, one REDIRECT rule per port to
// toPort, for IPv4 and, where the namespace's ip6tables nat table works, for
// IPv6. It converges from any start: no chain, stale rules, duplicated jumps,
// another toPort, the leftovers of a crashed run. A namespace already in the
// desired state costs two listings per family and no write. No ports at all
// means Clear.
func (n *NAT) Apply(netnsPath string, ports []uint16, toPort uint16) error {
	want, err := redirectRules(ports, toPort)
	if err != nil {
		return fmt.Errorf("applying redirect rules in %s: %w", netnsPath, err)
	}
	if len(want) == 0 {
		return n.Clear(netnsPath)
	}
	prev, havePrev := n.takeRead(netnsPath)
	st := prev.v4
	if !havePrev {
		if st, err = n.read(netnsPath, n.v4); err != nil {
			return fmt.Errorf("applying ipv4 redirect rules in %s: %w", netnsPath, err)
		}
	}
	if err := n.restore(netnsPath, n.v4, applyCommands(st, want)); err != nil {
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
	if err := n.restore(netnsPath, n.v6, applyCommands(st, want)); err != nil {
		return fmt.Errorf("applying ipv6 redirect rules in %s: %w", netnsPath, err)
	}
	return nil
}

// Clear removes every jump to Chain and Chain itself from the network
// namespace at netnsPath, both families. Nothing to remove is success.
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

func (n *NAT) clear(path string, t tables) error {
	var listing []string
	if err := n.do(path, func() (err error) {
		listing, err = t.List(table, output)
		return err
	}); err != nil {
		return listErr{fmt.Errorf("listing %s %s: %w", table, output, err)}
	}
	jumps := parseJumps(listing)
	exists := len(jumps) > 0
	if !exists {
		// A chain nobody jumps to may still be ours, from a run that died
		// half-way or an earlier version.
		var chains []string
		if err := n.do(path, func() (err error) {
			chains, err = t.ListChains(table)
			return err
		}); err != nil {
			return listErr{fmt.Errorf("listing %s chains: %w", table, err)}
		}
		exists = hasChain(chains)
	}
	return n.restore(path, t, clearCommands(jumps, exists))
}

// Port returns the port the existing rules in the network namespace at
// netnsPath redirect to, or 0 when there are none, so a restarted daemon can
// listen on the same port again and the rules of its previous run keep
// working in the meantime. IPv4 rules are asked first, then IPv6 ones.
//
// The first Apply to the same namespace within a second reuses what Port
// listed instead of listing again: a new namespace then costs two iptables
// runs fewer, about a third of its set-up (BenchmarkSetUpOne against
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
	if p := toPortOf(st.rules); p != 0 || n.v6 == nil {
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
	return toPortOf(st6.rules), nil
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

// read lists what one family holds of ours: the jumps in OUTPUT and, when
// there is one, Chain's rules. A missing chain is only listed if a jump
// proves it exists, because iptables-nft reports a missing chain with the
// same exit status and a misleading message ("incompatible").
func (n *NAT) read(path string, t tables) (state, error) {
	var st state
	var listing []string
	if err := n.do(path, func() (err error) {
		listing, err = t.List(table, output)
		return err
	}); err != nil {
		return st, fmt.Errorf("listing %s %s: %w", table, output, err)
	}
	st.jumps = parseJumps(listing)
	if len(st.jumps) == 0 {
		return st, nil
	}
	if err := n.do(path, func() (err error) {
		listing, err = t.List(table, Chain)
		return err
	}); err != nil {
		return st, fmt.Errorf("listing %s %s: %w", table, Chain, err)
	}
	st.listed = true
	st.rules = parseChain(listing)
	return st, nil
}

// restore runs one iptables-restore transaction, or nothing for no lines.
func (n *NAT) restore(path string, t tables, lines []string) error {
	if len(lines) == 0 {
		return nil
	}
	input := restoreInput(lines)
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
// non-zero (a *goiptables.Error), rather than from entering the namespace or
// starting the program.
func ranAndFailed(err error) bool {
	var e interface{ ExitStatus() int }
	return errors.As(err, &e)
}

// listErr marks a failure to read the state, as opposed to one writing it.
type listErr struct{ error }

func (e listErr) Unwrap() error { return e.error }

func isListErr(err error) bool { return errors.As(err, new(listErr)) }

// execTables is the real tables: go-iptables for listings, the matching
// iptables-restore program for writes.
type execTables struct {
	*goiptables.IPTables
	restore string
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
