package main

import (
	"context"
	"fmt"
	"net"
	"os/exec"
	"regexp"
	"sort"
	"strings"
)

// Where the connectable daemon runs (issue 19 asks for both).
const (
	// A network namespace of the run's own, holding only loopback, dnsmasq
	// and one veth to the backend namespace: the daemon's dials meet no
	// rule or route but the run's.
	placementClean = "clean"
	// The machine's own network namespace, as users run the daemon: its
	// dials leave through the machine's routing and iptables (Docker's
	// rules among them), over the run's one veth to the backend namespace.
	placementHost = "host"
)

// placementWhere says in words where the daemon runs.
func placementWhere(placement string) string {
	if placement == placementHost {
		return "in the machine's own network namespace, as users run it"
	}
	return "in a network namespace of its own"
}

// machineLink creates, once per placement, the run's one veth in the
// machine's namespace, its peer in the backend namespace, and returns both
// names. In the host placement it is the daemon's way to the backend: the
// machine's end gets hostAddr/30, the peer beHostAddr/30, addresses of
// 198.18.0.0/15 that bring the kernel's connected route and nothing else.
// In the clean placement it stays without an address and only carries the
// macvlan network's frames. It never gets an IPv6 address (addrgenmode
// none), so no link-local route appears either. Removed by name at the end.
func (b *bench) machineLink(ctx context.Context) (vm, vb string, err error) {
	vm, vb = "cb"+b.tag+"-mv", "cb"+b.tag+"-bm"
	if b.machineVeth != "" {
		return vm, vb, nil
	}
	if _, err := command(ctx, "ip", "link", "add", vm, "type", "veth", "peer", "name", vb, "netns", b.beNS); err != nil {
		return "", "", err
	}
	b.machineVeth = vm
	b.onCleanup("veth "+vm, func() error {
		// Gone already if the backend namespace went first.
		if _, err := net.InterfaceByName(vm); err != nil {
			return nil
		}
		_, err := command(context.Background(), "ip", "link", "del", vm)
		return err
	})
	steps := [][]string{{"ip", "link", "set", vm, "addrgenmode", "none"}}
	if b.placement == placementHost {
		steps = append(steps,
			[]string{"ip", "addr", "add", hostAddr + "/30", "dev", vm},
			[]string{"ip", "-n", b.beNS, "addr", "add", beHostAddr + "/30", "dev", vb})
	}
	steps = append(steps,
		[]string{"ip", "link", "set", vm, "up"},
		[]string{"ip", "-n", b.beNS, "link", "set", vb, "up"})
	return vm, vb, runAll(ctx, steps...)
}

// The packet and byte counters iptables-save prints: traffic, not rules.
var counters = regexp.MustCompile(`\[\d+:\d+\]`)

// machineState is what the run must leave as it found it in the machine's
// own network namespace: routes, rules and iptables rules, one set of
// lines per command. A tool that is not installed counts as empty.
func machineState(ctx context.Context) (map[string][]string, error) {
	state := map[string][]string{}
	for _, argv := range [][]string{
		{"ip", "-4", "route", "show", "table", "all"},
		{"ip", "-6", "route", "show", "table", "all"},
		{"ip", "rule", "show"},
		{"iptables-save"},
		{"ip6tables-save"},
		{"iptables-legacy-save"},
		{"ip6tables-legacy-save"},
	} {
		if _, err := exec.LookPath(argv[0]); err != nil {
			continue
		}
		out, err := command(ctx, argv...)
		if err != nil {
			return nil, fmt.Errorf("reading the machine's namespace: %w", err)
		}
		var lines []string
		for _, l := range strings.Split(out, "\n") {
			l = strings.TrimSpace(counters.ReplaceAllString(l, ""))
			if l != "" && !strings.HasPrefix(l, "#") {
				lines = append(lines, l)
			}
		}
		sort.Strings(lines)
		state[strings.Join(argv, " ")] = lines
	}
	return state, nil
}

// stateDiff lists the lines added (+) or removed (-) between two states,
// but for those naming the device allowed (the run's own veth, whose
// address brings its connected and local routes).
func stateDiff(before, after map[string][]string, allowed string) []string {
	var diff []string
	keys := map[string]bool{}
	for k := range before {
		keys[k] = true
	}
	for k := range after {
		keys[k] = true
	}
	var sorted []string
	for k := range keys {
		sorted = append(sorted, k)
	}
	sort.Strings(sorted)
	count := func(lines []string) map[string]int {
		m := map[string]int{}
		for _, l := range lines {
			if allowed == "" || !strings.Contains(l, "dev "+allowed+" ") && !strings.HasSuffix(l, "dev "+allowed) {
				m[l]++
			}
		}
		return m
	}
	for _, k := range sorted {
		b, a := count(before[k]), count(after[k])
		for l, n := range a {
			if n > b[l] {
				diff = append(diff, fmt.Sprintf("%s: +%q", k, l))
			}
		}
		for l, n := range b {
			if n > a[l] {
				diff = append(diff, fmt.Sprintf("%s: -%q", k, l))
			}
		}
	}
	sort.Strings(diff)
	return diff
}
