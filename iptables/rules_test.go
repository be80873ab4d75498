package iptables

import (
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

func TestParseJumps(t *testing.T) {
	listing := []string{
		"-P OUTPUT ACCEPT",
		"-A OUTPUT -d 127.0.0.11/32 -j DOCKER_OUTPUT",
		"-A OUTPUT -j CONNECTABLE",
		"-A OUTPUT -p tcp -j CONNECTABLE",
		"-A OUTPUT -j CONNECTABLE_OTHER",
		`-A OUTPUT -m comment --comment "not -j CONNECTABLE" -j ACCEPT`,
		"-A OUTPUT -g CONNECTABLE",
	}
	want := []string{"-j CONNECTABLE", "-p tcp -j CONNECTABLE", "-g CONNECTABLE"}
	if got := parseJumps(listing); !slices.Equal(got, want) {
		t.Errorf("got %q; want %q", got, want)
	}
}

func TestParseChain(t *testing.T) {
	listing := []string{"-N CONNECTABLE", "-A CONNECTABLE -p tcp -j REDIRECT --to-ports 1", "-A OTHER -j ACCEPT"}
	want := []string{"-p tcp -j REDIRECT --to-ports 1"}
	if got := parseChain(listing); !slices.Equal(got, want) {
		t.Errorf("got %q; want %q", got, want)
	}
}

func TestApplyCommands(t *testing.T) {
	a, b, c := redirectRule(6000, 4000), redirectRule(6001, 4000), redirectRule(6002, 4000)
	old := redirectRule(6000, 3999)
	tests := []struct {
		name string
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
			st:   state{jumps: []string{jumpSpec}, listed: true, rules: []string{a, b}},
			want: []string{a, b},
			cmds: nil,
		},
		{
			name: "port added at the end appends only",
			st:   state{jumps: []string{jumpSpec}, listed: true, rules: []string{a, b}},
			want: []string{a, b, c},
			cmds: []string{"-A CONNECTABLE " + c},
		},
		{
			name: "port removed rebuilds the chain",
			st:   state{jumps: []string{jumpSpec}, listed: true, rules: []string{a, b}},
			want: []string{a},
			cmds: []string{":CONNECTABLE - [0:0]", "-A CONNECTABLE " + a},
		},
		{
			name: "old target port rebuilds the chain",
			st:   state{jumps: []string{jumpSpec}, listed: true, rules: []string{old}},
			want: []string{a},
			cmds: []string{":CONNECTABLE - [0:0]", "-A CONNECTABLE " + a},
		},
		{
			name: "duplicated jump",
			st:   state{jumps: []string{jumpSpec, jumpSpec}, listed: true, rules: []string{a}},
			want: []string{a},
			cmds: []string{"-D OUTPUT -j CONNECTABLE"},
		},
		{
			name: "foreign-looking jump replaced",
			st:   state{jumps: []string{"-p tcp -j CONNECTABLE"}, listed: true, rules: []string{a}},
			want: []string{a},
			cmds: []string{"-D OUTPUT -p tcp -j CONNECTABLE", "-I OUTPUT 1 -j CONNECTABLE"},
		},
		{
			name: "duplicated rule",
			st:   state{jumps: []string{jumpSpec}, listed: true, rules: []string{a, a}},
			want: []string{a},
			cmds: []string{":CONNECTABLE - [0:0]", "-A CONNECTABLE " + a},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := applyCommands(tt.st, tt.want); !slices.Equal(got, tt.cmds) {
				t.Errorf("got %q; want %q", got, tt.cmds)
			}
		})
	}
}

func TestClearCommands(t *testing.T) {
	tests := []struct {
		name   string
		jumps  []string
		exists bool
		want   []string
	}{
		{name: "nothing", want: nil},
		{name: "chain without jump", exists: true, want: []string{"-F CONNECTABLE", "-X CONNECTABLE"}},
		{name: "jumps", jumps: []string{jumpSpec, jumpSpec}, exists: true,
			want: []string{"-D OUTPUT -j CONNECTABLE", "-D OUTPUT -j CONNECTABLE", "-F CONNECTABLE", "-X CONNECTABLE"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := clearCommands(tt.jumps, tt.exists); !slices.Equal(got, tt.want) {
				t.Errorf("got %q; want %q", got, tt.want)
			}
		})
	}
}

func TestRestoreInput(t *testing.T) {
	got := restoreInput([]string{"-F CONNECTABLE"})
	if want := "*nat\n-F CONNECTABLE\nCOMMIT\n"; got != want {
		t.Errorf("got %q; want %q", got, want)
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
