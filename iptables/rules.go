package iptables

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// Chain is the name of connectable's own chain, in the nat table and in the
// filter table alike: chains belong to a table, so the two do not clash, and
// a human reading iptables-save finds everything of ours under one name. It
// never changes: a renamed chain would strand the rules of an earlier
// version.
const Chain = "CONNECTABLE"

// comment tags every rule in Chain, so a human reading iptables-save knows
// whose it is.
const comment = "connectable"

// part is one table's share of our rules: Chain in table, jumped to from the
// built-in chain hook.
type part struct{ table, hook string }

var (
	// redirectPart holds the REDIRECT rules. OUTPUT, because the
	// connections to redirect start inside the namespace.
	redirectPart = part{table: "nat", hook: "OUTPUT"}
	// guardPart holds the rules that drop a SYN to the relay's port while
	// nothing listens there; see guardRules. INPUT, because the redirected
	// SYN arrives there, on lo, addressed to the relay's port.
	guardPart = part{table: "filter", hook: "INPUT"}
)

// jumpSpec is the one rule in a part's hook that sends packets through
// Chain.
const jumpSpec = "-j " + Chain

// redirectRule is the rule for one labelled port, spelled exactly as
// `iptables -S` prints it back (with the implicit "-m tcp" made explicit), so
// a listing compares equal to what Apply wants without normalising.
func redirectRule(port, toPort uint16) string {
	return fmt.Sprintf("-p tcp -m addrtype --dst-type LOCAL -m tcp --dport %d -m comment --comment %s -j REDIRECT --to-ports %d",
		port, comment, toPort)
}

// redirectRules returns Chain's rules for ports, in ascending port order
// with duplicates dropped, all redirecting to toPort.
func redirectRules(ports []uint16, toPort uint16) ([]string, error) {
	if toPort == 0 {
		return nil, fmt.Errorf("redirect target port is 0")
	}
	sorted := slices.Clone(ports)
	slices.Sort(sorted)
	sorted = slices.Compact(sorted)
	rules := make([]string, 0, len(sorted))
	for _, p := range sorted {
		if p == 0 {
			return nil, fmt.Errorf("cannot redirect port 0")
		}
		if p == toPort {
			// The rule would redirect the proxy's own port to itself; the
			// labels are validated upstream, this only keeps the table sane.
			return nil, fmt.Errorf("port %d is the redirect target itself", p)
		}
		rules = append(rules, redirectRule(p, toPort))
	}
	return rules, nil
}

// guardRules returns the filter table's Chain for toPort: a SYN on lo to
// toPort that finds the relay's listener goes on as usual; one that finds
// none is dropped rather than answered with a RST, so the client's kernel
// sends it again (after 1 s, 3 s, ...) and the connect lands on the
// listener of the next daemon instead of being refused. The relay's
// listener is one marked IP_TRANSPARENT (--transparent; netns.Listen marks
// them), so that a daemon about to stop can close its gate (netns.Gate)
// before it closes the listener: a SYN then waits for the next daemon
// instead of landing in an accept queue that closing resets. A relay that
// listens without the mark (a build older than the guard, started over its
// rules) would have every SYN dropped: it knows neither the mark nor this
// chain. --nowildcard:
// the relay binds 127.0.0.1 and ::1, not a wildcard. Spelled as
// `iptables -S` prints them back, checked on iptables 1.8.9, nft and
// legacy, both families: the implicit "-m tcp" explicit, the flags in the
// kernel's order.
func guardRules(toPort uint16) []string {
	syn := fmt.Sprintf("-i lo -p tcp -m tcp --dport %d --tcp-flags FIN,SYN,RST,ACK SYN", toPort)
	return []string{
		syn + " -m socket --transparent --nowildcard -m comment --comment " + comment + " -j RETURN",
		syn + " -m comment --comment " + comment + " -j DROP",
	}
}

// state is what one family's table holds that concerns one part, read from
// an `iptables -t <table> -S` listing. Specs are rules without their
// "-A <chain> " prefix.
type state struct {
	jumps  []string // rules in the part's hook whose target is Chain, in order
	exists bool     // the table has Chain, jumped to or not
	rules  []string // Chain's rules
}

// parseTable picks p's state out of an `iptables -t <table> -S` listing.
func parseTable(p part, listing []string) state {
	var st state
	for _, line := range listing {
		if line == "-N "+Chain {
			st.exists = true
			continue
		}
		if spec, ok := strings.CutPrefix(line, "-A "+Chain+" "); ok {
			st.rules = append(st.rules, spec)
			continue
		}
		spec, ok := strings.CutPrefix(line, "-A "+p.hook+" ")
		if !ok {
			continue
		}
		f := fields(spec)
		for i := 0; i+1 < len(f); i++ {
			if (f[i] == "-j" || f[i] == "-g") && f[i+1] == Chain {
				st.jumps = append(st.jumps, spec)
				break
			}
		}
	}
	return st
}

// port returns the port the REDIRECT rules of a nat state send to, or 0.
// Rules in a chain nobody jumps to redirect nothing, so they name no port.
func (st state) port() uint16 {
	if len(st.jumps) == 0 {
		return 0
	}
	return toPortOf(st.rules)
}

// applyCommands returns the iptables-restore lines (for p's table, run with
// --noflush) that turn st into exactly one jump from p's hook plus want, or
// nil when st is already there. Lines that delete rules come only when
// something is stale: with nf_tables every deletion waits for an RCU grace
// period, so the common cases (fresh namespace, ports added) never delete.
func applyCommands(p part, st state, want []string) []string {
	var cmds []string
	keep := false
	for _, j := range st.jumps {
		if j == jumpSpec && !keep {
			keep = true
			continue
		}
		cmds = append(cmds, "-D "+p.hook+" "+j)
	}
	switch {
	case !st.exists:
		cmds = append(cmds, declare())
		cmds = appendRules(cmds, want)
	case slices.Equal(st.rules, want):
	case len(st.rules) < len(want) && slices.Equal(st.rules, want[:len(st.rules)]):
		cmds = appendRules(cmds, want[len(st.rules):])
	default:
		// Declaring an existing chain under --noflush empties it.
		cmds = append(cmds, declare())
		cmds = appendRules(cmds, want)
	}
	if !keep {
		cmds = append(cmds, "-I "+p.hook+" 1 "+jumpSpec)
	}
	return cmds
}

// clearCommands returns the restore lines (for p's table) that remove every
// jump from p's hook to Chain and Chain itself, or nil when st has nothing
// of ours. A chain nobody jumps to is ours too: a run that died half-way or
// an earlier version left it.
func clearCommands(p part, st state) []string {
	var cmds []string
	for _, j := range st.jumps {
		cmds = append(cmds, "-D "+p.hook+" "+j)
	}
	if st.exists || len(st.jumps) > 0 {
		cmds = append(cmds, "-F "+Chain, "-X "+Chain)
	}
	return cmds
}

// declare is the restore line that creates Chain or, under --noflush,
// empties it if it exists.
func declare() string { return ":" + Chain + " - [0:0]" }

func appendRules(cmds, rules []string) []string {
	for _, r := range rules {
		cmds = append(cmds, "-A "+Chain+" "+r)
	}
	return cmds
}

// section is one table's lines of an iptables-restore input.
type section struct {
	table string
	lines []string
}

// restoreInput wraps the non-empty sections, in order, into one
// iptables-restore input, or "" when all are empty. Each section ends in
// COMMIT: the kernel applies a table's section whole or not at all, and
// iptables-restore stops at the first that fails, so the sections before it
// stay applied and those after it are not tried.
func restoreInput(sections ...section) string {
	var b strings.Builder
	for _, s := range sections {
		if len(s.lines) == 0 {
			continue
		}
		b.WriteString("*" + s.table + "\n")
		for _, l := range s.lines {
			b.WriteString(l)
			b.WriteByte('\n')
		}
		b.WriteString("COMMIT\n")
	}
	return b.String()
}

// toPortOf returns the --to-ports of the first REDIRECT rule among specs that
// carries our comment, or 0.
func toPortOf(specs []string) uint16 {
	for _, spec := range specs {
		f := fields(spec)
		if !slices.Contains(f, "REDIRECT") || !containsPair(f, "--comment", comment) {
			continue
		}
		for i := 0; i+1 < len(f); i++ {
			if f[i] != "--to-ports" {
				continue
			}
			if p, err := strconv.ParseUint(f[i+1], 10, 16); err == nil && p != 0 {
				return uint16(p)
			}
		}
	}
	return 0
}

func containsPair(f []string, k, v string) bool {
	for i := 0; i+1 < len(f); i++ {
		if f[i] == k && f[i+1] == v {
			return true
		}
	}
	return false
}

// fields splits a rule as iptables -S prints it: on spaces, except inside
// double quotes (comments), with backslash escaping the next character.
func fields(s string) []string {
	var (
		out    []string
		cur    strings.Builder
		inQ    bool
		inWord bool
	)
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '\\' && i+1 < len(s):
			i++
			cur.WriteByte(s[i])
			inWord = true
		case c == '"':
			inQ = !inQ
			inWord = true
		case c == ' ' && !inQ:
			if inWord {
				out = append(out, cur.String())
				cur.Reset()
				inWord = false
			}
		default:
			cur.WriteByte(c)
			inWord = true
		}
	}
	if inWord {
		out = append(out, cur.String())
	}
	return out
}
