package iptables

import (
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"testing"
)

// fakeTables is an in-memory nat table of one family in one namespace. It
// understands the restore lines this package writes and the commands a
// crashed run could have left, and applies each transaction all or nothing,
// like the kernel.
type fakeTables struct {
	chains map[string][]string // chain -> rule specs; builtins always present

	lists, restores int    // calls, to check how many programs Apply runs
	failList        bool   // every listing fails as if ip6tables nat were missing
	lastRestore     string // input of the last Restore
}

var builtins = []string{"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"}

func newFakeTables() *fakeTables {
	f := &fakeTables{chains: map[string][]string{}}
	for _, b := range builtins {
		f.chains[b] = nil
	}
	return f
}

// fakeExitError stands for *goiptables.Error: the program ran and failed.
type fakeExitError struct{ msg string }

func (e fakeExitError) Error() string   { return e.msg }
func (e fakeExitError) ExitStatus() int { return 1 }

func (f *fakeTables) List(tbl, chain string) ([]string, error) {
	f.lists++
	if f.failList || tbl != table {
		return nil, fakeExitError{"can't initialize ip6tables table `nat': Table does not exist"}
	}
	rules, ok := f.chains[chain]
	if !ok {
		return nil, fakeExitError{fmt.Sprintf("chain `%s' in table `nat' is incompatible, use 'nft' tool.", chain)}
	}
	var out []string
	if slices.Contains(builtins, chain) {
		out = append(out, "-P "+chain+" ACCEPT")
	} else {
		out = append(out, "-N "+chain)
	}
	for _, r := range rules {
		out = append(out, "-A "+chain+" "+r)
	}
	return out, nil
}

func (f *fakeTables) ListChains(tbl string) ([]string, error) {
	f.lists++
	if f.failList || tbl != table {
		return nil, fakeExitError{"table does not exist"}
	}
	chains := slices.Clone(builtins)
	for _, c := range slices.Sorted(maps.Keys(f.chains)) {
		if !slices.Contains(builtins, c) {
			chains = append(chains, c)
		}
	}
	return chains, nil
}

func (f *fakeTables) Restore(input string) error {
	f.restores++
	f.lastRestore = input
	next := map[string][]string{}
	for c, r := range f.chains {
		next[c] = slices.Clone(r)
	}
	lines := strings.Split(strings.TrimSuffix(input, "\n"), "\n")
	if len(lines) < 2 || lines[0] != "*nat" || lines[len(lines)-1] != "COMMIT" {
		return fmt.Errorf("restore: malformed input %q", input)
	}
	for _, l := range lines[1 : len(lines)-1] {
		if err := fakeCommand(next, l); err != nil {
			return fmt.Errorf("restore: line %q: %w", l, err)
		}
	}
	// The kernel refuses a jump to a missing chain.
	if _, ok := next[Chain]; !ok && len(parseJumps(prefixed("OUTPUT", next["OUTPUT"]))) > 0 {
		return fmt.Errorf("restore: OUTPUT jumps to missing chain %s", Chain)
	}
	f.chains = next
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
	for _, c := range slices.Sorted(maps.Keys(f.chains)) {
		fmt.Fprintf(&b, ":%s\n", c)
	}
	for _, c := range slices.Sorted(maps.Keys(f.chains)) {
		for _, r := range f.chains[c] {
			fmt.Fprintf(&b, "-A %s %s\n", c, r)
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
