package iptables

import (
	"errors"
	"slices"
	"strings"
	"testing"
)

func TestRedirectRules(t *testing.T) {
	r := func(p, to uint16) string { return redirectRule(p, to) }
	tests := []struct {
		name    string
		ports   []uint16
		toPort  uint16
		want    []string
		wantErr bool
	}{
		{name: "none", ports: nil, toPort: 4000, want: []string{}},
		{name: "one", ports: []uint16{6000}, toPort: 4000, want: []string{r(6000, 4000)}},
		{name: "sorted", ports: []uint16{8500, 6000, 53}, toPort: 4000, want: []string{r(53, 4000), r(6000, 4000), r(8500, 4000)}},
		{name: "deduplicated", ports: []uint16{6000, 6000}, toPort: 4000, want: []string{r(6000, 4000)}},
		{name: "port zero", ports: []uint16{0}, toPort: 4000, wantErr: true},
		{name: "target zero", ports: []uint16{6000}, toPort: 0, wantErr: true},
		{name: "target is a port", ports: []uint16{4000}, toPort: 4000, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := redirectRules(tt.ports, tt.toPort)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v; want error %v", err, tt.wantErr)
			}
			if err == nil && !slices.Equal(got, tt.want) {
				t.Errorf("got %q; want %q", got, tt.want)
			}
		})
	}
}

func TestRedirectRuleSpelling(t *testing.T) {
	// As iptables -S prints it back, checked on iptables 1.8.9 (nft and
	// legacy, both families); the root tests prove it against the binary.
	const want = "-p tcp -m addrtype --dst-type LOCAL -m tcp --dport 6000 -m comment --comment connectable -j REDIRECT --to-ports 4000"
	if got := redirectRule(6000, 4000); got != want {
		t.Errorf("got %q; want %q", got, want)
	}
}

func TestGuardRuleSpelling(t *testing.T) {
	// As iptables -S prints them back, checked on iptables 1.8.9 (nft and
	// legacy, both families); the root tests prove it against the binary.
	want := []string{
		"-i lo -p tcp -m tcp --dport 4000 --tcp-flags FIN,SYN,RST,ACK SYN -m socket --transparent --nowildcard -m comment --comment connectable -j RETURN",
		"-i lo -p tcp -m tcp --dport 4000 --tcp-flags FIN,SYN,RST,ACK SYN -m comment --comment connectable -j DROP",
	}
	if got := guardRules(4000); !slices.Equal(got, want) {
		t.Errorf("got %q; want %q", got, want)
	}
}

func TestParseTable(t *testing.T) {
	listing := []string{
		"-P PREROUTING ACCEPT",
		"-P OUTPUT ACCEPT",
		"-N CONNECTABLE",
		"-N CONNECTABLE_OTHER",
		"-A PREROUTING -j CONNECTABLE",
		"-A OUTPUT -d 127.0.0.11/32 -j DOCKER_OUTPUT",
		"-A OUTPUT -j CONNECTABLE",
		"-A OUTPUT -p tcp -j CONNECTABLE",
		"-A OUTPUT -j CONNECTABLE_OTHER",
		`-A OUTPUT -m comment --comment "not -j CONNECTABLE" -j ACCEPT`,
		"-A OUTPUT -g CONNECTABLE",
		"-A CONNECTABLE -p tcp -j REDIRECT --to-ports 1",
		"-A CONNECTABLE_OTHER -j ACCEPT",
	}
	want := state{
		jumps:  []string{"-j CONNECTABLE", "-p tcp -j CONNECTABLE", "-g CONNECTABLE"},
		exists: true,
		rules:  []string{"-p tcp -j REDIRECT --to-ports 1"},
	}
	got := parseTable(redirectPart, listing)
	if !slices.Equal(got.jumps, want.jumps) || got.exists != want.exists || !slices.Equal(got.rules, want.rules) {
		t.Errorf("got %+v; want %+v", got, want)
	}
	// Another hook: OUTPUT's jumps are not INPUT's.
	if got := parseTable(guardPart, listing); len(got.jumps) != 0 || !got.exists {
		t.Errorf("as filter INPUT: got %+v; want no jumps, chain exists", got)
	}
	if got := parseTable(redirectPart, []string{"-P OUTPUT ACCEPT"}); got.exists || got.jumps != nil || got.rules != nil {
		t.Errorf("empty table: got %+v", got)
	}
}

func TestStatePort(t *testing.T) {
	r := redirectRule(6000, 4321)
	if got := (state{jumps: []string{jumpSpec}, exists: true, rules: []string{r}}).port(); got != 4321 {
		t.Errorf("jumped-to chain: port %d; want 4321", got)
	}
	// A chain nobody jumps to redirects nothing.
	if got := (state{exists: true, rules: []string{r}}).port(); got != 0 {
		t.Errorf("lone chain: port %d; want 0", got)
	}
}

func TestApplyCommands(t *testing.T) {
	a, b, c := redirectRule(6000, 4000), redirectRule(6001, 4000), redirectRule(6002, 4000)
	old := redirectRule(6000, 3999)
	tests := []struct {
		name string
		p    part
		st   state
		want []string
		cmds []string
	}{
		{
			name: "fresh namespace",
			st:   state{},
			want: []string{a, b},
			cmds: []string{":CONNECTABLE - [0:0]", "-A CONNECTABLE " + a, "-A CONNECTABLE " + b, "-I OUTPUT 1 -j CONNECTABLE"},
		},
		{
			name: "already converged",
			st:   state{jumps: []string{jumpSpec}, exists: true, rules: []string{a, b}},
			want: []string{a, b},
			cmds: nil,
		},
		{
			name: "port added at the end appends only",
			st:   state{jumps: []string{jumpSpec}, exists: true, rules: []string{a, b}},
			want: []string{a, b, c},
			cmds: []string{"-A CONNECTABLE " + c},
		},
		{
			name: "port removed rebuilds the chain",
			st:   state{jumps: []string{jumpSpec}, exists: true, rules: []string{a, b}},
			want: []string{a},
			cmds: []string{":CONNECTABLE - [0:0]", "-A CONNECTABLE " + a},
		},
		{
			name: "old target port rebuilds the chain",
			st:   state{jumps: []string{jumpSpec}, exists: true, rules: []string{old}},
			want: []string{a},
			cmds: []string{":CONNECTABLE - [0:0]", "-A CONNECTABLE " + a},
		},
		{
			name: "duplicated jump",
			st:   state{jumps: []string{jumpSpec, jumpSpec}, exists: true, rules: []string{a}},
			want: []string{a},
			cmds: []string{"-D OUTPUT -j CONNECTABLE"},
		},
		{
			name: "foreign-looking jump replaced",
			st:   state{jumps: []string{"-p tcp -j CONNECTABLE"}, exists: true, rules: []string{a}},
			want: []string{a},
			cmds: []string{"-D OUTPUT -p tcp -j CONNECTABLE", "-I OUTPUT 1 -j CONNECTABLE"},
		},
		{
			name: "duplicated rule",
			st:   state{jumps: []string{jumpSpec}, exists: true, rules: []string{a, a}},
			want: []string{a},
			cmds: []string{":CONNECTABLE - [0:0]", "-A CONNECTABLE " + a},
		},
		{
			name: "right chain without jump gets the jump only",
			st:   state{exists: true, rules: []string{a}},
			want: []string{a},
			cmds: []string{"-I OUTPUT 1 -j CONNECTABLE"},
		},
		{
			name: "guard, fresh",
			p:    guardPart,
			want: guardRules(4000),
			cmds: []string{":CONNECTABLE - [0:0]", "-A CONNECTABLE " + guardRules(4000)[0], "-A CONNECTABLE " + guardRules(4000)[1], "-I INPUT 1 -j CONNECTABLE"},
		},
		{
			name: "guard, new port, duplicated jump",
			p:    guardPart,
			st:   state{jumps: []string{jumpSpec, jumpSpec}, exists: true, rules: guardRules(3999)},
			want: guardRules(4000),
			cmds: []string{"-D INPUT -j CONNECTABLE", ":CONNECTABLE - [0:0]", "-A CONNECTABLE " + guardRules(4000)[0], "-A CONNECTABLE " + guardRules(4000)[1]},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.p == (part{}) {
				tt.p = redirectPart
			}
			if got := applyCommands(tt.p, tt.st, tt.want); !slices.Equal(got, tt.cmds) {
				t.Errorf("got %q; want %q", got, tt.cmds)
			}
		})
	}
}

func TestClearCommands(t *testing.T) {
	tests := []struct {
		name string
		p    part
		st   state
		want []string
	}{
		{name: "nothing", p: redirectPart, want: nil},
		{name: "chain without jump", p: redirectPart, st: state{exists: true}, want: []string{"-F CONNECTABLE", "-X CONNECTABLE"}},
		{name: "jumps", p: redirectPart, st: state{jumps: []string{jumpSpec, jumpSpec}, exists: true},
			want: []string{"-D OUTPUT -j CONNECTABLE", "-D OUTPUT -j CONNECTABLE", "-F CONNECTABLE", "-X CONNECTABLE"}},
		{name: "guard", p: guardPart, st: state{jumps: []string{"-p tcp -j CONNECTABLE"}, exists: true, rules: guardRules(1)},
			want: []string{"-D INPUT -p tcp -j CONNECTABLE", "-F CONNECTABLE", "-X CONNECTABLE"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := clearCommands(tt.p, tt.st); !slices.Equal(got, tt.want) {
				t.Errorf("got %q; want %q", got, tt.want)
			}
		})
	}
}

func TestRestoreInput(t *testing.T) {
	got := restoreInput(section{"filter", []string{"-F CONNECTABLE"}}, section{"mangle", nil}, section{"nat", []string{"-X CONNECTABLE"}})
	if want := "*filter\n-F CONNECTABLE\nCOMMIT\n*nat\n-X CONNECTABLE\nCOMMIT\n"; got != want {
		t.Errorf("got %q; want %q", got, want)
	}
	if got := restoreInput(section{"nat", nil}); got != "" {
		t.Errorf("no lines: got %q; want nothing", got)
	}
}

func TestLacksSocketMatch(t *testing.T) {
	for msg, want := range map[string]bool{
		socketMissing: true,
		"iptables-restore v1.8.9 (legacy): Couldn't load match `socket':No such file or directory\n\nError occurred at line: 3": true,
		"Warning: Extension socket revision 0 not supported, missing kernel module?\niptables-restore: line 5 failed":           true,
		"iptables-nft-restore: line 4 failed: No such file or directory":                                                        false,
		"Couldn't load match `sockets':No such file or directory":                                                               false,
	} {
		if got := lacksSocketMatch(errors.New(msg)); got != want {
			t.Errorf("lacksSocketMatch(%q) = %v; want %v", msg, got, want)
		}
	}
}

func TestToPortOf(t *testing.T) {
	tests := []struct {
		name  string
		specs []string
		want  uint16
	}{
		{name: "none", want: 0},
		{name: "ours", specs: []string{redirectRule(6000, 4321)}, want: 4321},
		{name: "first wins", specs: []string{redirectRule(6000, 4321), redirectRule(6001, 1)}, want: 4321},
		{name: "not ours", specs: []string{"-p tcp -j REDIRECT --to-ports 99"}, want: 0},
		{name: "range ignored", specs: []string{"-p tcp -m comment --comment connectable -j REDIRECT --to-ports 1-2"}, want: 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := toPortOf(tt.specs); got != tt.want {
				t.Errorf("got %d; want %d", got, tt.want)
			}
		})
	}
}

func TestFields(t *testing.T) {
	tests := []struct {
		in   string
		want []string
	}{
		{"-A X -j Y", []string{"-A", "X", "-j", "Y"}},
		{`-m comment --comment "a b" -j Y`, []string{"-m", "comment", "--comment", "a b", "-j", "Y"}},
		{`--comment "say \"hi\""`, []string{"--comment", `say "hi"`}},
		{`--comment ""`, []string{"--comment", ""}},
		{"  spaced   out ", []string{"spaced", "out"}},
	}
	for _, tt := range tests {
		if got := fields(tt.in); !slices.Equal(got, tt.want) {
			t.Errorf("fields(%q) = %q; want %q", tt.in, got, tt.want)
		}
	}
}

func TestPickBackend(t *testing.T) {
	tests := []struct {
		nft, legacy int
		want        string
	}{
		{0, 0, BackendNFT},
		{12, 0, BackendNFT},
		{0, 12, BackendLegacy},
		{3, 12, BackendNFT},
	}
	for _, tt := range tests {
		if got := pickBackend(tt.nft, tt.legacy); got != tt.want {
			t.Errorf("pickBackend(%d, %d) = %s; want %s", tt.nft, tt.legacy, got, tt.want)
		}
	}
}

func TestCountRules(t *testing.T) {
	save := strings.Join([]string{
		"# Generated by iptables-nft-save v1.8.9 (nf_tables)",
		"*nat",
		":PREROUTING ACCEPT [0:0]",
		":DOCKER - [0:0]",
		"-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER",
		"-A DOCKER -i docker0 -j RETURN",
		"COMMIT",
		"",
	}, "\n")
	if got := countRules([]byte(save)); got != 2 {
		t.Errorf("got %d; want 2", got)
	}
	if got := countRules(nil); got != 0 {
		t.Errorf("empty: got %d; want 0", got)
	}
}

func TestNormalizeBackend(t *testing.T) {
	for in, want := range map[string]string{"": "", "auto": "", "NFT": BackendNFT, "nf_tables": BackendNFT, "legacy": BackendLegacy} {
		got, err := normalizeBackend(in)
		if err != nil || got != want {
			t.Errorf("normalizeBackend(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	if _, err := normalizeBackend("iptables"); err == nil {
		t.Errorf("normalizeBackend(iptables): no error")
	}
}
