package iptables

import (
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
	tests := []struct {
		name  string
		setup map[string][]string // chain -> specs, on top of the builtins
	}{
		{name: "fresh"},
		{name: "chain without jump", setup: map[string][]string{Chain: {redirectRule(1, 2)}}},
		{name: "duplicated jumps", setup: map[string][]string{
			"OUTPUT": {"-j CONNECTABLE", "-d 127.0.0.11/32 -j DOCKER_OUTPUT", "-j CONNECTABLE", "-p tcp -j CONNECTABLE"},
			Chain:    {redirectRule(6000, to), redirectRule(8500, to)},
		}},
		{name: "old target port", setup: map[string][]string{
			"OUTPUT": {"-j CONNECTABLE"},
			Chain:    {redirectRule(6000, 3999), redirectRule(8500, 3999)},
		}},
		{name: "stale and duplicated rules", setup: map[string][]string{
			"OUTPUT": {"-j CONNECTABLE"},
			Chain:    {redirectRule(7000, to), redirectRule(6000, to), redirectRule(6000, to), "-p udp -j ACCEPT"},
		}},
	}
	want := wantDump(t, ports, to)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n, v4, v6 := newFakeNAT(t)
			for _, f := range []*fakeTables{v4, v6} {
				for c, specs := range tt.setup {
					f.chains[c] = append([]string(nil), specs...)
				}
			}
			if err := n.Apply("ns", ports, to); err != nil {
				t.Fatalf("Apply: %v", err)
			}
			for fam, f := range map[string]*fakeTables{"v4": v4, "v6": v6} {
				got := f.dump()
				if strings.Contains(tt.name, "duplicated jumps") {
					// Docker's rule stays: Apply touches only what is ours.
					if !strings.Contains(got, "-A OUTPUT -d 127.0.0.11/32 -j DOCKER_OUTPUT") {
						t.Errorf("%s: foreign rule removed:\n%s", fam, got)
					}
					got = strings.Replace(got, "-A OUTPUT -d 127.0.0.11/32 -j DOCKER_OUTPUT\n", "", 1)
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
	// Fresh: one listing of OUTPUT and one restore per family.
	if v4.lists != 1 || v4.restores != 1 || v6.lists != 1 || v6.restores != 1 {
		t.Errorf("fresh Apply: v4 %d lists %d restores, v6 %d lists %d restores; want 1 and 1 each",
			v4.lists, v4.restores, v6.lists, v6.restores)
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
	v4.chains["OUTPUT"] = append(v4.chains["OUTPUT"], "-j CONNECTABLE")
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

	// A lone chain nobody jumps to is ours too.
	v4.chains[Chain] = []string{redirectRule(1, 2)}
	if err := n.Clear("ns"); err != nil {
		t.Fatalf("Clear of a lone chain: %v", err)
	}
	if got := v4.dump(); got != clean {
		t.Errorf("after Clear of a lone chain got\n%s\nwant\n%s", got, clean)
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
	v6b.chains = v6.chains
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
// Applies; the second listing per family is saved, and the result is what
// a fresh Apply writes.
func TestPortThenApplyListsOnce(t *testing.T) {
	ports := []uint16{6000, 6001}
	n, v4, v6 := newFakeNAT(t)
	if p, err := n.Port("ns"); err != nil || p != 0 {
		t.Fatalf("Port on a fresh namespace = %d, %v; want 0, nil", p, err)
	}
	if err := n.Apply("ns", ports, 4000); err != nil {
		t.Fatal(err)
	}
	if v4.lists != 1 || v6.lists != 1 || v4.restores != 1 || v6.restores != 1 {
		t.Errorf("Port then Apply: v4 %d lists %d restores, v6 %d lists %d restores; want 1 and 1 each",
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
		if v4.lists != 1 {
			t.Errorf("Apply(b) after Port(a) listed %d times; want 1", v4.lists)
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
		if v4.lists != 1 {
			t.Errorf("Apply after a stale Port listed %d times; want 1", v4.lists)
		}
	})
}
