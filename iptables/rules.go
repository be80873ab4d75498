package iptables

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// Chain is the name of connectable's own chain in the nat table. It never
// changes: a renamed chain would strand the rules of an earlier version.
const Chain = "CONNECTABLE"

// comment tags every redirect rule, so a human reading iptables-save knows
// whose it is.
const comment = "connectable"

const (
	table  = "nat"
	output = "OUTPUT"
)

// jumpSpec is the one rule in OUTPUT that sends locally generated packets
// through Chain.
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

// state is what one family's nat table holds that concerns us, read from
// `iptables -S` listings. Specs are rules without their "-A <chain> " prefix.
type state struct {
	jumps []string // rules in OUTPUT whose target is Chain, in order
	// listed says whether rules holds Chain's listing. Apply lists the chain
	// only when a jump proves it exists: iptables-nft cannot tell a missing
	// chain from a foreign one by exit status.
	listed bool
	rules  []string
}

// parseJumps returns the specs of the rules in an `-S OUTPUT` listing that
// jump (or go) to Chain.
func parseJumps(listing []string) []string {
	var jumps []string
	for _, line := range listing {
		spec, ok := strings.CutPrefix(line, "-A "+output+" ")
		if !ok {
			continue
		}
		f := fields(spec)
		for i := 0; i+1 < len(f); i++ {
			if (f[i] == "-j" || f[i] == "-g") && f[i+1] == Chain {
				jumps = append(jumps, spec)
				break
			}
		}
	}
	return jumps
}

// parseChain returns the rule specs of an `-S CONNECTABLE` listing.
func parseChain(listing []string) []string {
	var rules []string
	for _, line := range listing {
		if spec, ok := strings.CutPrefix(line, "-A "+Chain+" "); ok {
			rules = append(rules, spec)
		}
	}
	return rules
}

// hasChain reports whether a ListChains answer names Chain.
func hasChain(chains []string) bool {
	return slices.Contains(chains, Chain)
}

// applyCommands returns the iptables-restore lines (for the nat table, run
// with --noflush) that turn st into exactly one jump plus want, or nil when
// st is already there. Lines that delete rules come only when something is
// stale: with nf_tables every deletion waits for an RCU grace period, so
// the common cases (fresh namespace, ports added) never delete.
func applyCommands(st state, want []string) []string {
	var cmds []string
	keep := false
	for _, j := range st.jumps {
		if j == jumpSpec && !keep {
			keep = true
			continue
		}
		cmds = append(cmds, "-D "+output+" "+j)
	}
	switch {
	case !st.listed:
		// No jump, so no listing: the chain may still be there (a run that
		// died between creating it and jumping to it, or a hand-made one).
		// Declaring it creates it or flushes it, either way empty.
		cmds = append(cmds, declare())
		cmds = appendRules(cmds, want)
	case slices.Equal(st.rules, want):
	case len(st.rules) < len(want) && slices.Equal(st.rules, want[:len(st.rules)]):
		cmds = appendRules(cmds, want[len(st.rules):])
	default:
		cmds = append(cmds, declare())
		cmds = appendRules(cmds, want)
	}
	if !keep {
		cmds = append(cmds, "-I "+output+" 1 "+jumpSpec)
	}
	return cmds
}

// clearCommands returns the restore lines that remove every jump to Chain
// and Chain itself, or nil when there is nothing of ours.
func clearCommands(jumps []string, chainExists bool) []string {
	var cmds []string
	for _, j := range jumps {
		cmds = append(cmds, "-D "+output+" "+j)
	}
	if chainExists || len(jumps) > 0 {
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

// restoreInput wraps lines into one iptables-restore transaction on the nat
// table: the kernel applies all of it or none.
func restoreInput(lines []string) string {
	var b strings.Builder
	b.WriteString("*" + table + "\n")
	for _, l := range lines {
		b.WriteString(l)
		b.WriteByte('\n')
	}
	b.WriteString("COMMIT\n")
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
