package iptables

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
)

// wantDump is the fake's dump after Apply(ports, toPort) from scratch.
func wantDump(t *testing.T, ports []uint16, toPort uint16) string {
	t.Helper()
	n, v4, _ := newFakeNAT(t)
	if err := n.Apply("ns", ports, toPort); err != nil {
		t.Fatalf("Apply on a fresh fake: %v", err)
	}
	return v4.dump()
}

func TestApplyConvergesFromAnyStart(t *testing.T) {
	ports := []uint16{6000, 8500}
	const to = 4000
	type tableSetup = map[string][]string // chain -> specs, on top of the builtins
	tests := []struct {
		name          string
		nat, filter   tableSetup
		foreignOutput bool // setup has Docker's rule in nat OUTPUT
	}{
		{name: "fresh"},
		{name: "chain without jump", nat: tableSetup{Chain: {redirectRule(1, 2)}}},
		{name: "duplicated jumps", foreignOutput: true, nat: tableSetup{
			"OUTPUT": {"-j CONNECTABLE", "-d 127.0.0.11/32 -j DOCKER_OUTPUT", "-j CONNECTABLE", "-p tcp -j CONNECTABLE"},
			Chain:    {redirectRule(6000, to), redirectRule(8500, to)},
		}},
		{name: "old target port", nat: tableSetup{
			"OUTPUT": {"-j CONNECTABLE"},
			Chain:    {redirectRule(6000, 3999), redirectRule(8500, 3999)},
		}, filter: tableSetup{
			"INPUT": {"-j CONNECTABLE"},
			Chain:   guardRules(3999),
		}},
		{name: "stale and duplicated rules", nat: tableSetup{
			"OUTPUT": {"-j CONNECTABLE"},
			Chain:    {redirectRule(7000, to), redirectRule(6000, to), redirectRule(6000, to), "-p udp -j ACCEPT"},
		}, filter: tableSetup{
			"INPUT": {"-j CONNECTABLE"},
			Chain:   append(guardRules(to), guardRules(to)[1], "-p udp -j ACCEPT"),
		}},
		{name: "nat right, no guard yet (an earlier version)", nat: tableSetup{
			"OUTPUT": {"-j CONNECTABLE"},
			Chain:    {redirectRule(6000, to), redirectRule(8500, to)},
		}},
		{name: "guard chain without jump", filter: tableSetup{Chain: guardRules(to)}},
		{name: "duplicated guard jumps", filter: tableSetup{
			"INPUT": {"-j CONNECTABLE", "-i lo -j ACCEPT", "-p tcp -j CONNECTABLE", "-j CONNECTABLE"},
			Chain:   guardRules(to),
		}},
		{name: "guard only half there", filter: tableSetup{
			"INPUT": {"-j CONNECTABLE"},
			Chain:   guardRules(to)[:1],
		}},
	}
	want := wantDump(t, ports, to)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n, v4, v6 := newFakeNAT(t)
			for _, f := range []*fakeTables{v4, v6} {
				for c, specs := range tt.nat {
					f.nat()[c] = append([]string(nil), specs...)
				}
				for c, specs := range tt.filter {
					f.filter()[c] = append([]string(nil), specs...)
				}
			}
			if err := n.Apply("ns", ports, to); err != nil {
				t.Fatalf("Apply: %v", err)
			}
			for fam, f := range map[string]*fakeTables{"v4": v4, "v6": v6} {
				got := f.dump()
				// Foreign rules stay: Apply touches only what is ours.
				foreign := []string{}
				if tt.foreignOutput {
					foreign = append(foreign, "-A OUTPUT -d 127.0.0.11/32 -j DOCKER_OUTPUT\n")
				}
				if strings.Contains(tt.name, "duplicated guard jumps") {
					foreign = append(foreign, "-A INPUT -i lo -j ACCEPT\n")
				}
				for _, r := range foreign {
					if !strings.Contains(got, r) {
						t.Errorf("%s: foreign rule %q removed:\n%s", fam, r, got)
					}
					got = strings.Replace(got, r, "", 1)
				}
				if got != want {
					t.Errorf("%s: got\n%s\nwant\n%s", fam, got, want)
				}
			}
			// A second Apply finds everything in place: listings only.
			v4.restores, v6.restores = 0, 0
			if err := n.Apply("ns", ports, to); err != nil {
				t.Fatalf("second Apply: %v", err)
			}
			if v4.restores+v6.restores != 0 {
				t.Errorf("second Apply wrote %d times; want 0 (last input %q)", v4.restores+v6.restores, v4.lastRestore)
			}
		})
	}
}

func TestApplyExecCount(t *testing.T) {
	n, v4, v6 := newFakeNAT(t)
	if err := n.Apply("ns", []uint16{6000, 6001}, 4000); err != nil {
		t.Fatal(err)
	}
	// Fresh: a listing of each table (nat and filter) and one restore,
	// writing both, per family. Before the guard this was one listing of
	// nat OUTPUT; a whole table's listing replaces the two of OUTPUT and
	// the chain that any later Apply needed.
	if v4.lists != 2 || v4.restores != 1 || v6.lists != 2 || v6.restores != 1 {
		t.Errorf("fresh Apply: v4 %d lists %d restores, v6 %d lists %d restores; want 2 and 1 each",
			v4.lists, v4.restores, v6.lists, v6.restores)
	}
	if !strings.HasPrefix(v4.lastRestore, "*filter\n") || !strings.Contains(v4.lastRestore, "COMMIT\n*nat\n") {
		t.Errorf("fresh Apply's restore is not filter then nat in one input:\n%s", v4.lastRestore)
	}
	v4.lists, v4.restores = 0, 0
	if err := n.Apply("ns", []uint16{6000, 6001, 6002}, 4000); err != nil {
		t.Fatal(err)
	}
	if v4.lists != 2 || v4.restores != 1 {
		t.Errorf("changed Apply: %d lists %d restores; want 2 and 1", v4.lists, v4.restores)
	}
	if strings.Contains(v4.lastRestore, "-D ") || strings.Contains(v4.lastRestore, ":"+Chain) {
		t.Errorf("adding a port deleted or flushed rules:\n%s", v4.lastRestore)
	}
	if strings.Contains(v4.lastRestore, "*filter") {
		t.Errorf("adding a port rewrote the guard, which did not change:\n%s", v4.lastRestore)
	}
	v4.lists, v4.restores = 0, 0
	if err := n.Apply("ns", []uint16{6000, 6001, 6002}, 4000); err != nil {
		t.Fatal(err)
	}
	if v4.lists != 2 || v4.restores != 0 {
		t.Errorf("unchanged Apply: %d lists %d restores; want 2 and 0", v4.lists, v4.restores)
	}
}

func TestApplyChangedPortsLeaveNoStaleRule(t *testing.T) {
	n, v4, _ := newFakeNAT(t)
	if err := n.Apply("ns", []uint16{6000, 6001}, 4000); err != nil {
		t.Fatal(err)
	}
	if err := n.Apply("ns", []uint16{6001, 6002}, 4001); err != nil {
		t.Fatal(err)
	}
	if got, want := v4.dump(), wantDump(t, []uint16{6001, 6002}, 4001); got != want {
		t.Errorf("got\n%s\nwant\n%s", got, want)
	}
}

func TestClearRemovesEverythingOurs(t *testing.T) {
	n, v4, v6 := newFakeNAT(t)
	clean := v4.dump()
	if err := n.Apply("ns", []uint16{6000}, 4000); err != nil {
		t.Fatal(err)
	}
	v4.nat()["OUTPUT"] = append(v4.nat()["OUTPUT"], "-j CONNECTABLE")
	v6.filter()["INPUT"] = append(v6.filter()["INPUT"], "-p tcp -j CONNECTABLE")
	if err := n.Clear("ns"); err != nil {
		t.Fatalf("Clear: %v", err)
	}
	for _, f := range []*fakeTables{v4, v6} {
		if got := f.dump(); got != clean {
			t.Errorf("after Clear got\n%s\nwant\n%s", got, clean)
		}
	}
	if p, err := n.Port("ns"); err != nil || p != 0 {
		t.Errorf("Port after Clear = %d, %v; want 0, nil", p, err)
	}
	v4.restores = 0
	if err := n.Clear("ns"); err != nil {
		t.Fatalf("second Clear: %v", err)
	}
	if v4.restores != 0 {
		t.Errorf("Clear of a clean table wrote %d times", v4.restores)
	}

	// A lone chain nobody jumps to is ours too, in either table.
	v4.nat()[Chain] = []string{redirectRule(1, 2)}
	v4.filter()[Chain] = guardRules(2)
	v6.filter()[Chain] = nil
	if err := n.Clear("ns"); err != nil {
		t.Fatalf("Clear of lone chains: %v", err)
	}
	for _, f := range []*fakeTables{v4, v6} {
		if got := f.dump(); got != clean {
			t.Errorf("after Clear of lone chains got\n%s\nwant\n%s", got, clean)
		}
	}
	if !strings.HasPrefix(v4.lastRestore, "*nat\n") || !strings.Contains(v4.lastRestore, "COMMIT\n*filter\n") {
		t.Errorf("Clear's restore is not nat then filter in one input:\n%s", v4.lastRestore)
	}
}

func TestApplyWithoutPortsClears(t *testing.T) {
	n, v4, _ := newFakeNAT(t)
	clean := v4.dump()
	if err := n.Apply("ns", []uint16{6000}, 4000); err != nil {
		t.Fatal(err)
	}
	if err := n.Apply("ns", nil, 4000); err != nil {
		t.Fatal(err)
	}
	if got := v4.dump(); got != clean {
		t.Errorf("got\n%s\nwant\n%s", got, clean)
	}
}

func TestPort(t *testing.T) {
	n, _, v6 := newFakeNAT(t)
	if p, err := n.Port("ns"); err != nil || p != 0 {
		t.Errorf("Port before Apply = %d, %v; want 0, nil", p, err)
	}
	if err := n.Apply("ns", []uint16{6000}, 43210); err != nil {
		t.Fatal(err)
	}
	if p, err := n.Port("ns"); err != nil || p != 43210 {
		t.Errorf("Port = %d, %v; want 43210, nil", p, err)
	}
	// Only IPv6 rules left (say IPv4 was cleared by hand): still found.
	n2, _, v6b := newFakeNAT(t)
	v6b.tables = v6.tables
	if p, err := n2.Port("ns"); err != nil || p != 43210 {
		t.Errorf("Port from IPv6 rules = %d, %v; want 43210, nil", p, err)
	}
}

func TestIPv6NatUnusable(t *testing.T) {
	n, v4, v6 := newFakeNAT(t)
	v6.failList = true
	if err := n.Apply("ns", []uint16{6000}, 4000); err != nil {
		t.Fatalf("Apply with unusable ip6tables: %v", err)
	}
	if !strings.Contains(v4.dump(), "--dport 6000") {
		t.Errorf("ipv4 rules missing:\n%s", v4.dump())
	}
	if !n.v6Warned.Load() {
		t.Errorf("no warning logged")
	}
	if err := n.Apply("ns", []uint16{6000}, 4000); err != nil {
		t.Fatalf("second Apply: %v", err)
	}
	if err := n.Clear("ns"); err != nil {
		t.Fatalf("Clear with unusable ip6tables: %v", err)
	}
	if p, err := n.Port("ns"); err != nil || p != 0 {
		t.Errorf("Port = %d, %v; want 0, nil", p, err)
	}
}

func TestApplyRejectsBadInput(t *testing.T) {
	n, v4, _ := newFakeNAT(t)
	if err := n.Apply("ns", []uint16{6000}, 0); err == nil {
		t.Errorf("toPort 0: no error")
	}
	if err := n.Apply("ns", []uint16{0}, 4000); err == nil {
		t.Errorf("port 0: no error")
	}
	if v4.lists+v4.restores != 0 {
		t.Errorf("bad input still ran iptables")
	}
}

// TestPortThenApplyListsOnce: a daemon asks Port before it listens, then
// Applies; Apply lists nothing again, and the result is what a fresh Apply
// writes. Port lists both tables per family although it needs only nat, so
// that Apply can skip its own listings: two per family, once in all.
func TestPortThenApplyListsOnce(t *testing.T) {
	ports := []uint16{6000, 6001}
	n, v4, v6 := newFakeNAT(t)
	if p, err := n.Port("ns"); err != nil || p != 0 {
		t.Fatalf("Port on a fresh namespace = %d, %v; want 0, nil", p, err)
	}
	if err := n.Apply("ns", ports, 4000); err != nil {
		t.Fatal(err)
	}
	if v4.lists != 2 || v6.lists != 2 || v4.restores != 1 || v6.restores != 1 {
		t.Errorf("Port then Apply: v4 %d lists %d restores, v6 %d lists %d restores; want 2 and 1 each",
			v4.lists, v4.restores, v6.lists, v6.restores)
	}
	if got, want := v4.dump(), wantDump(t, ports, 4000); got != want {
		t.Errorf("got\n%s\nwant\n%s", got, want)
	}
	// The reading is used once: the next Apply lists again.
	v4.lists = 0
	if err := n.Apply("ns", ports, 4000); err != nil {
		t.Fatal(err)
	}
	if v4.lists == 0 {
		t.Error("a second Apply reused Port's old listing")
	}
}

// TestPortReadingsInterleaved: set-ups of two namespaces that interleave,
// as the proxy's do, each reuse their own Port's listing.
func TestPortReadingsInterleaved(t *testing.T) {
	n, v4, v6 := newFakeNAT(t)
	n.Port("a")
	n.Port("b")
	v4.lists, v6.lists = 0, 0
	for _, ns := range []string{"b", "a"} {
		if err := n.Apply(ns, []uint16{6000}, 4000); err != nil {
			t.Fatal(err)
		}
	}
	if v4.lists != 0 || v6.lists != 0 {
		t.Errorf("Applies after interleaved Ports listed %d (v4) and %d (v6) times; want 0", v4.lists, v6.lists)
	}
}

// TestPortReadingNotReused: Port's listing serves only an Apply of the same
// namespace that no Clear preceded.
func TestPortReadingNotReused(t *testing.T) {
	t.Run("other namespace", func(t *testing.T) {
		n, v4, _ := newFakeNAT(t)
		n.Port("a")
		v4.lists = 0
		if err := n.Apply("b", []uint16{6000}, 4000); err != nil {
			t.Fatal(err)
		}
		if v4.lists != 2 {
			t.Errorf("Apply(b) after Port(a) listed %d times; want 2", v4.lists)
		}
	})
	t.Run("after Clear", func(t *testing.T) {
		n, v4, _ := newFakeNAT(t)
		if err := n.Apply("ns", []uint16{6000}, 4000); err != nil {
			t.Fatal(err)
		}
		n.Port("ns") // sees the jump and the rule
		if err := n.Clear("ns"); err != nil {
			t.Fatal(err)
		}
		// With Port's reading, Apply would delete a jump Clear removed
		// and the restore would fail.
		if err := n.Apply("ns", []uint16{6000}, 4000); err != nil {
			t.Fatalf("Apply after Port and Clear: %v", err)
		}
		if got, want := v4.dump(), wantDump(t, []uint16{6000}, 4000); got != want {
			t.Errorf("got\n%s\nwant\n%s", got, want)
		}
	})
	t.Run("stale", func(t *testing.T) {
		n, v4, _ := newFakeNAT(t)
		n.Port("ns")
		r := n.reads["ns"]
		r.at = r.at.Add(-readReuse)
		n.reads["ns"] = r
		v4.lists = 0
		if err := n.Apply("ns", []uint16{6000}, 4000); err != nil {
			t.Fatal(err)
		}
		if v4.lists != 2 {
			t.Errorf("Apply after a stale Port listed %d times; want 2", v4.lists)
		}
	})
}

// TestGuardUnavailable: on a kernel without the socket match, Apply still
// installs the redirect rules, warns once, and from then on leaves the
// filter table alone.
func TestGuardUnavailable(t *testing.T) {
	n, v4, v6 := newFakeNAT(t)
	var logs bytes.Buffer
	n.log = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	v4.noSocket, v6.noSocket = true, true
	clean := v4.dump()
	if err := n.Apply("ns", []uint16{6000}, 4000); err != nil {
		t.Fatalf("Apply without the socket match: %v", err)
	}
	for fam, f := range map[string]*fakeTables{"v4": v4, "v6": v6} {
		if got := f.nat()[Chain]; len(got) != 1 || got[0] != redirectRule(6000, 4000) {
			t.Errorf("%s: redirect rules %q", fam, got)
		}
		if _, ok := f.filter()[Chain]; ok || len(f.filter()["INPUT"]) != 0 {
			t.Errorf("%s: filter table touched:\n%s", fam, f.dump())
		}
	}
	// IPv4 tried both tables and then nat alone; IPv6, knowing, nat alone.
	if v4.restores != 2 || v6.restores != 1 {
		t.Errorf("restores: v4 %d, v6 %d; want 2 and 1", v4.restores, v6.restores)
	}
	if !n.noGuard.Load() {
		t.Error("guard not marked unavailable")
	}
	if got := strings.Count(logs.String(), "level=WARN"); got != 1 ||
		!strings.Contains(logs.String(), "connects during a daemon restart are refused instead of waiting for the next start") {
		t.Errorf("want one warning naming the consequence; got\n%s", logs.String())
	}

	// Later Applies neither list nor write the filter table.
	v4.lists, v4.restores = 0, 0
	if err := n.Apply("ns", []uint16{6000, 6001}, 4000); err != nil {
		t.Fatal(err)
	}
	if v4.lists != 1 || v4.restores != 1 || strings.Contains(v4.lastRestore, "*filter") {
		t.Errorf("Apply after: %d lists %d restores, last input\n%s\nwant 1, 1 and nat only", v4.lists, v4.restores, v4.lastRestore)
	}
	// One that was under way when the first found out says so at debug
	// level only.
	n.guardUnavailable("ns2", fakeExitError{socketMissing})
	if got := strings.Count(logs.String(), "level=WARN"); got != 1 {
		t.Errorf("%d warnings; want 1", got)
	}
	if err := n.Clear("ns"); err != nil {
		t.Fatal(err)
	}
	if got := v4.dump(); got != clean {
		t.Errorf("after Clear got\n%s\nwant\n%s", got, clean)
	}
}

// TestApplyOtherFailureKeepsGuard: a restore that fails for a reason other
// than the socket match is an error, and the guard is not given up.
func TestApplyOtherFailureKeepsGuard(t *testing.T) {
	n, v4, _ := newFakeNAT(t)
	v4.failRestore = "iptables-nft-restore: line 4 failed: No such file or directory"
	if err := n.Apply("ns", []uint16{6000}, 4000); err == nil {
		t.Error("Apply with a failing restore: no error")
	}
	if v4.restores != 1 {
		t.Errorf("%d restores; want 1, no retry", v4.restores)
	}
	if n.noGuard.Load() {
		t.Error("guard marked unavailable by an unrelated failure")
	}
}
