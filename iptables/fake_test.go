package iptables

import (
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"testing"
)

// fakeTables is the nat and filter tables of one family in one namespace,
// in memory. It understands the restore lines this package writes and the
// commands a crashed run could have left, and applies each table's section
// of a restore all or nothing, stopping at the first that fails, like
// iptables-restore.
type fakeTables struct {
	tables map[string]map[string][]string // table -> chain -> rule specs; builtins always present

	lists, restores int    // calls, to check how many programs Apply runs
	failList        bool   // every listing fails as if ip6tables nat were missing
	noSocket        bool   // restores using -m socket fail as on a kernel without xt_socket
	failRestore     string // if set, every restore fails with this message
	lastRestore     string // input of the last Restore
}

var builtins = map[string][]string{
	"nat":    {"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"},
	"filter": {"INPUT", "FORWARD", "OUTPUT"},
}

func newFakeTables() *fakeTables {
	f := &fakeTables{tables: map[string]map[string][]string{}}
	for tbl, chains := range builtins {
		f.tables[tbl] = map[string][]string{}
		for _, b := range chains {
			f.tables[tbl][b] = nil
		}
	}
	return f
}

// nat and filter return the fake's chains of one table, to set up or
// inspect.
func (f *fakeTables) nat() map[string][]string    { return f.tables["nat"] }
func (f *fakeTables) filter() map[string][]string { return f.tables["filter"] }

// fakeExitError stands for *exec.ExitError: the program ran and failed.
type fakeExitError struct{ msg string }

func (e fakeExitError) Error() string   { return e.msg }
func (e fakeExitError) ExitStatus() int { return 1 }

func (f *fakeTables) ListTable(tbl string) ([]string, error) {
	f.lists++
	chains, ok := f.tables[tbl]
	if f.failList || !ok {
		return nil, fakeExitError{fmt.Sprintf("can't initialize ip6tables table `%s': Table does not exist", tbl)}
	}
	var out []string
	for _, c := range builtins[tbl] {
		out = append(out, "-P "+c+" ACCEPT")
	}
	names := slices.Sorted(maps.Keys(chains))
	for _, c := range names {
		if !slices.Contains(builtins[tbl], c) {
			out = append(out, "-N "+c)
		}
	}
	// Rules in the order iptables -S prints chains: builtins first.
	for _, c := range builtins[tbl] {
		out = append(out, prefixed(c, chains[c])...)
	}
	for _, c := range names {
		if !slices.Contains(builtins[tbl], c) {
			out = append(out, prefixed(c, chains[c])...)
		}
	}
	return out, nil
}

// socketMissing is what iptables-nft-restore says on a kernel without
// xt_socket.
const socketMissing = "Warning: Extension socket revision 0 not supported, missing kernel module?\n" +
	"iptables-nft-restore v1.8.9 (nf_tables): \nline 3: RULE_APPEND failed (No such file or directory): rule in chain CONNECTABLE"

func (f *fakeTables) Restore(input string) error {
	f.restores++
	f.lastRestore = input
	if f.failRestore != "" {
		return fakeExitError{f.failRestore}
	}
	lines := strings.Split(strings.TrimSuffix(input, "\n"), "\n")
	for len(lines) > 0 {
		tbl, ok := strings.CutPrefix(lines[0], "*")
		end := slices.Index(lines, "COMMIT")
		if !ok || end < 0 || f.tables[tbl] == nil {
			return fmt.Errorf("restore: malformed input %q", input)
		}
		if err := f.commit(tbl, lines[1:end]); err != nil {
			return err
		}
		lines = lines[end+1:]
	}
	return nil
}

// commit applies one table's section all or nothing.
func (f *fakeTables) commit(tbl string, lines []string) error {
	next := map[string][]string{}
	for c, r := range f.tables[tbl] {
		next[c] = slices.Clone(r)
	}
	for _, l := range lines {
		if f.noSocket && strings.Contains(l, "-m socket") {
			return fakeExitError{socketMissing}
		}
		if err := fakeCommand(next, l); err != nil {
			return fmt.Errorf("restore: line %q: %w", l, err)
		}
	}
	// The kernel refuses a jump to a missing chain.
	if _, ok := next[Chain]; !ok {
		for c, rs := range next {
			for _, r := range rs {
				if strings.HasSuffix(r, "-j "+Chain) || strings.HasSuffix(r, "-g "+Chain) {
					return fmt.Errorf("restore: %s %s jumps to missing chain %s", tbl, c, Chain)
				}
			}
		}
	}
	f.tables[tbl] = next
	return nil
}

func fakeCommand(t map[string][]string, l string) error {
	if name, ok := strings.CutPrefix(l, ":"); ok {
		name = strings.Fields(name)[0]
		t[name] = nil // --noflush: create or flush
		return nil
	}
	op, rest, _ := strings.Cut(l, " ")
	chain, spec, _ := strings.Cut(rest, " ")
	rules, exists := t[chain]
	switch op {
	case "-N":
		if exists {
			return fmt.Errorf("chain %s exists", chain)
		}
		t[chain] = nil
		return nil
	}
	if !exists {
		return fmt.Errorf("no chain %s", chain)
	}
	switch op {
	case "-A":
		t[chain] = append(rules, spec)
	case "-I":
		pos, s, _ := strings.Cut(spec, " ")
		if pos != "1" {
			return fmt.Errorf("fake only inserts at 1")
		}
		t[chain] = append([]string{s}, rules...)
	case "-D":
		i := slices.Index(rules, spec)
		if i < 0 {
			return fmt.Errorf("no such rule")
		}
		t[chain] = slices.Delete(rules, i, i+1)
	case "-F":
		t[chain] = nil
	case "-X":
		if len(rules) > 0 {
			return fmt.Errorf("chain %s not empty", chain)
		}
		for c, rs := range t {
			for _, r := range rs {
				if strings.HasSuffix(r, "-j "+chain) {
					return fmt.Errorf("chain %s referenced from %s", chain, c)
				}
			}
		}
		delete(t, chain)
	default:
		return fmt.Errorf("fake does not know %s", op)
	}
	return nil
}

func prefixed(chain string, specs []string) []string {
	out := make([]string, len(specs))
	for i, s := range specs {
		out[i] = "-A " + chain + " " + s
	}
	return out
}

// dump renders the fake's state like iptables-save, for comparisons.
func (f *fakeTables) dump() string {
	var b strings.Builder
	for _, tbl := range slices.Sorted(maps.Keys(f.tables)) {
		chains := f.tables[tbl]
		fmt.Fprintf(&b, "*%s\n", tbl)
		for _, c := range slices.Sorted(maps.Keys(chains)) {
			fmt.Fprintf(&b, ":%s\n", c)
		}
		for _, c := range slices.Sorted(maps.Keys(chains)) {
			for _, r := range chains[c] {
				fmt.Fprintf(&b, "-A %s %s\n", c, r)
			}
		}
	}
	return b.String()
}

// newFakeNAT returns a NAT on two fakes, running everything in place.
func newFakeNAT(t *testing.T) (*NAT, *fakeTables, *fakeTables) {
	v4, v6 := newFakeTables(), newFakeTables()
	n := &NAT{
		backend: BackendNFT,
		log:     slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})),
		v4:      v4,
		v6:      v6,
		do:      func(_ string, fn func() error) error { return fn() },
	}
	return n, v4, v6
}

// tWriter sends log lines to t.Log.
type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}
