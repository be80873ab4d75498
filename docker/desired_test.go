package docker

import (
	"fmt"
	"slices"
	"testing"
	"time"
)

func TestDesired(t *testing.T) {
	t0 := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	// ct builds a kept container: id, pid and creation order from n.
	ct := func(n int, mode, owner string, netIno uint64, routes map[uint16]string) *container {
		id := fmt.Sprintf("%012d%052d", n, 0)
		return &container{id: id, name: fmt.Sprintf("c%d", n), created: t0.Add(time.Duration(n) * time.Second),
			pid: 1000 + n, netns: netnsPath(1000 + n), mode: mode, owner: owner, netIno: netIno, routes: routes, labeled: routes != nil}
	}
	id := func(n int) string { return fmt.Sprintf("%012d%052d", n, 0) }
	join := func(n int) string { return "container:" + id(n) }
	type ns struct { // a Namespace, briefly
		key     int
		pid     int
		members []int
		routes  map[uint16]string
	}
	tests := []struct {
		name     string
		cs       []*container
		self     string
		forbid   map[uint64]bool
		want     []ns
		problems []string // "c<n> <what>"
	}{
		{name: "nothing"},
		{
			name: "one container",
			cs:   []*container{ct(1, "bridge", "", 11, map[uint16]string{6000: "a"})},
			want: []ns{{key: 1, pid: 1001, members: []int{1}, routes: map[uint16]string{6000: "a"}}},
		},
		{
			name: "unlabelled container alone is not a namespace",
			cs:   []*container{ct(1, "bridge", "", 11, nil)},
		},
		{
			name: "member merged into its unlabelled owner, owner first",
			cs: []*container{
				ct(2, join(1), id(1), 11, map[uint16]string{6000: "a"}),
				ct(1, "bridge", "", 11, nil),
			},
			want: []ns{{key: 1, pid: 1001, members: []int{1, 2}, routes: map[uint16]string{6000: "a"}}},
		},
		{
			name: "owner's claim wins over an earlier member's",
			cs: []*container{
				ct(1, join(3), id(3), 11, map[uint16]string{6000: "member", 6001: "m"}),
				ct(3, "bridge", "", 11, map[uint16]string{6000: "owner"}),
			},
			want:     []ns{{key: 3, pid: 1003, members: []int{3, 1}, routes: map[uint16]string{6000: "owner", 6001: "m"}}},
			problems: []string{"c1 conflict:connect.6000"},
		},
		{
			name: "among members the earlier one wins; the same value is no conflict",
			cs: []*container{
				ct(1, "bridge", "", 11, nil),
				ct(3, join(1), id(1), 11, map[uint16]string{6000: "late", 6001: "same"}),
				ct(2, join(1), id(1), 11, map[uint16]string{6000: "early", 6001: "same"}),
			},
			want:     []ns{{key: 1, pid: 1001, members: []int{1, 2, 3}, routes: map[uint16]string{6000: "early", 6001: "same"}}},
			problems: []string{"c3 conflict:connect.6000"},
		},
		{
			name: "chains are followed to the first owner",
			cs: []*container{
				ct(1, "bridge", "", 11, map[uint16]string{6000: "a"}),
				ct(2, join(1), id(1), 11, map[uint16]string{6001: "b"}),
				ct(3, join(2), id(2), 11, map[uint16]string{6002: "c"}),
			},
			want: []ns{{key: 1, pid: 1001, members: []int{1, 2, 3}, routes: map[uint16]string{6000: "a", 6001: "b", 6002: "c"}}},
		},
		{
			name: "member whose owner is gone keys its namespace itself",
			cs:   []*container{ct(2, join(1), id(1), 11, map[uint16]string{6000: "a"})},
			want: []ns{{key: 2, pid: 1002, members: []int{2}, routes: map[uint16]string{6000: "a"}}},
		},
		{
			name: "member whose owner restarted into another namespace keys its own",
			cs: []*container{
				ct(1, "bridge", "", 12, map[uint16]string{6000: "a"}),
				ct(2, join(1), id(1), 11, map[uint16]string{6001: "b"}),
			},
			want: []ns{
				{key: 1, pid: 1001, members: []int{1}, routes: map[uint16]string{6000: "a"}},
				{key: 2, pid: 1002, members: []int{2}, routes: map[uint16]string{6001: "b"}},
			},
		},
		{
			name:     "host network mode is skipped, and so is a container that joined one",
			cs:       []*container{ct(1, "host", "", 1, map[uint16]string{6000: "a"}), ct(2, join(1), id(1), 1, map[uint16]string{6001: "b"})},
			problems: []string{"c1 host", "c2 host"},
		},
		{
			name:     "a container that joined the daemon's own is skipped",
			cs:       []*container{ct(2, join(1), id(1), 5, map[uint16]string{6001: "b"})},
			self:     id(1)[:12],
			problems: []string{"c2 self"},
		},
		{
			name:     "a forbidden namespace is skipped, reported on its owner",
			cs:       []*container{ct(1, "bridge", "", 1, nil), ct(2, join(1), id(1), 1, map[uint16]string{6000: "a"})},
			forbid:   map[uint64]bool{1: true},
			problems: []string{"c1 hostns"},
		},
		{
			name: "namespaces sorted by key; none and default modes alike",
			cs: []*container{
				ct(2, "none", "", 12, map[uint16]string{6000: "b"}),
				ct(1, "", "", 11, map[uint16]string{6000: "a"}),
			},
			want: []ns{
				{key: 1, pid: 1001, members: []int{1}, routes: map[uint16]string{6000: "a"}},
				{key: 2, pid: 1002, members: []int{2}, routes: map[uint16]string{6000: "b"}},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, problems := desired(tt.cs, tt.self, tt.forbid)
			var want []Namespace
			for _, w := range tt.want {
				n := Namespace{Key: id(w.key), Path: netnsPath(w.pid), Routes: w.routes}
				for _, m := range w.members {
					n.Containers = append(n.Containers, Container{ID: short(id(m)), Name: fmt.Sprintf("c%d", m)})
				}
				want = append(want, n)
			}
			if !slices.EqualFunc(got, want, sameNamespace) {
				t.Errorf("namespaces:\n got %v\nwant %v", got, want)
			}
			var gotProblems []string
			for _, p := range problems {
				name := ""
				for i := 0; i+1 < len(p.args); i += 2 {
					if p.args[i] == "container" {
						name = p.args[i+1].(string)
					}
				}
				if p.msg == "" || name == "" {
					t.Errorf("problem without a message or container: %+v", p)
				}
				gotProblems = append(gotProblems, name+" "+p.what)
			}
			slices.Sort(gotProblems)
			if !slices.Equal(gotProblems, tt.problems) {
				t.Errorf("problems = %q; want %q", gotProblems, tt.problems)
			}
		})
	}
}
