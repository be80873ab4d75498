package main

import (
	"reflect"
	"strings"
	"testing"
)

func TestPlacementFlag(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{nil, []string{placementClean, placementHost}},
		{[]string{"--placement", "both"}, []string{placementClean, placementHost}},
		{[]string{"--placement", "clean"}, []string{placementClean}},
		{[]string{"--placement", "host", "--quick"}, []string{placementHost}},
	} {
		c, err := parseFlags(tc.args)
		if err != nil {
			t.Fatalf("%v: %v", tc.args, err)
		}
		if !reflect.DeepEqual(c.placements, tc.want) {
			t.Errorf("%v: placements %v, want %v", tc.args, c.placements, tc.want)
		}
	}
	if _, err := parseFlags([]string{"--placement", "machine"}); err == nil || !strings.Contains(err.Error(), "machine") {
		t.Errorf("--placement machine: error %v, want one naming the value", err)
	}
}

// Each connectable contender names its data path: the daemon's default
// is about to change.
func TestDaemonArgsNameTheDataPath(t *testing.T) {
	for _, placement := range []string{placementClean, placementHost} {
		b := &bench{cfg: &config{connectable: "/bin/connectable"}, dir: "/tmp/x"}
		b.startPlacement(placement)
		for _, kind := range []string{relayDaemon, socketDaemon} {
			argv := strings.Join(b.daemonArgs(kind), " ")
			if !strings.Contains(argv, " --datapath "+kind) {
				t.Errorf("%s %s: %q lacks --datapath %s", placement, kind, argv, kind)
			}
			if nsenter := strings.Contains(argv, "nsenter --net="+nsPath(b.hostNS)); nsenter != (placement == placementClean) {
				t.Errorf("%s %s: %q: nsenter into the daemon's namespace %v", placement, kind, argv, nsenter)
			}
		}
	}
}

func TestStateDiff(t *testing.T) {
	before := map[string][]string{
		"ip -4 route show table all": {"default via 192.0.2.1 dev eth0"},
		"iptables-save":              {"-A FORWARD -j DOCKER-USER"},
	}
	during := map[string][]string{
		"ip -4 route show table all": {"default via 192.0.2.1 dev eth0",
			"198.19.77.0/30 dev cbabc123h-mv proto kernel scope link src 198.19.77.1",
			"local 198.19.77.1 dev cbabc123h-mv table local proto kernel scope host src 198.19.77.1"},
		"iptables-save": {"-A FORWARD -j DOCKER-USER"},
	}
	if d := stateDiff(before, during, "cbabc123h-mv"); len(d) != 0 {
		t.Errorf("the run's veth's own routes counted as a change: %v", d)
	}
	if d := stateDiff(before, during, ""); len(d) != 2 {
		t.Errorf("after the clean-up the veth's routes must count: %v", d)
	}
	// A device whose name starts like the run's is not the run's.
	during["ip -4 route show table all"] = append(during["ip -4 route show table all"], "198.18.0.0/15 dev cbabc123h-mvx scope link")
	during["iptables-save"] = []string{"-A FORWARD -j DOCKER-USER", "-A OUTPUT -j ACCEPT"}
	delete(during, "ip -6 route show table all")
	before["ip -6 route show table all"] = []string{"fe80::/64 dev eth0"}
	want := []string{
		`ip -4 route show table all: +"198.18.0.0/15 dev cbabc123h-mvx scope link"`,
		`ip -6 route show table all: -"fe80::/64 dev eth0"`,
		`iptables-save: +"-A OUTPUT -j ACCEPT"`,
	}
	if d := stateDiff(before, during, "cbabc123h-mv"); !reflect.DeepEqual(d, want) {
		t.Errorf("diff\n%v\nwant\n%v", strings.Join(d, "\n"), strings.Join(want, "\n"))
	}
}
