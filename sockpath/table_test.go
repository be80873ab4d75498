package sockpath

import (
	"net/netip"
	"testing"
)

func TestApportion(t *testing.T) {
	ep := func(i int) netip.AddrPort {
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, 0, byte(i)}), 80)
	}
	none := func(netip.AddrPort) bool { return false }
	count := func(slots []uint8) map[uint8]int {
		m := map[uint8]int{}
		for _, s := range slots {
			m[s]++
		}
		return m
	}
	for _, tc := range []struct {
		name  string
		cands []candidate
		dead  func(netip.AddrPort) bool
		want  map[netip.AddrPort]int // slots per endpoint
	}{
		{"equal", []candidate{{addr: ep(1), priority: 1, target: 1, weight: 1}, {addr: ep(2), priority: 1, target: 2, weight: 1}},
			none, map[netip.AddrPort]int{ep(1): 512, ep(2): 512}},
		{"weights 1:3", []candidate{{addr: ep(1), priority: 1, target: 1, weight: 1}, {addr: ep(2), priority: 1, target: 2, weight: 3}},
			none, map[netip.AddrPort]int{ep(1): 256, ep(2): 768}},
		{"a target's weight is shared by its addresses", []candidate{
			{addr: ep(1), priority: 1, target: 1, weight: 2}, {addr: ep(2), priority: 1, target: 1, weight: 2},
			{addr: ep(3), priority: 1, target: 2, weight: 2}},
			none, map[netip.AddrPort]int{ep(1): 256, ep(2): 256, ep(3): 512}},
		{"weight 0 only while no weighted target lives", []candidate{
			{addr: ep(1), priority: 1, target: 1, weight: 5}, {addr: ep(2), priority: 1, target: 2, weight: 0}},
			none, map[netip.AddrPort]int{ep(1): 1024}},
		{"all weight 0 is uniform", []candidate{
			{addr: ep(1), priority: 1, target: 1, weight: 0}, {addr: ep(2), priority: 1, target: 2, weight: 0}},
			none, map[netip.AddrPort]int{ep(1): 512, ep(2): 512}},
		{"weighted dead: weight 0 serves", []candidate{
			{addr: ep(1), priority: 1, target: 1, weight: 5}, {addr: ep(2), priority: 1, target: 2, weight: 0}},
			func(a netip.AddrPort) bool { return a == ep(1) }, map[netip.AddrPort]int{ep(2): 1024}},
		{"best live priority", []candidate{
			{addr: ep(1), priority: 1, target: 1, weight: 1}, {addr: ep(2), priority: 2, target: 2, weight: 1}},
			func(a netip.AddrPort) bool { return a == ep(1) }, map[netip.AddrPort]int{ep(2): 1024}},
		{"a tiny weight still gets a slot", []candidate{
			{addr: ep(1), priority: 1, target: 1, weight: 1}, {addr: ep(2), priority: 1, target: 2, weight: 65535}},
			none, map[netip.AddrPort]int{ep(1): 1, ep(2): 1023}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			eps, slots, ok, err := apportion(tc.cands, tc.dead)
			if err != nil || !ok || len(slots) != nslots {
				t.Fatalf("apportion: ok=%v err=%v, %d slots", ok, err, len(slots))
			}
			got := map[netip.AddrPort]int{}
			for i, n := range count(slots) {
				got[eps[i]] = n
			}
			if len(got) != len(tc.want) {
				t.Fatalf("slots %v; want %v", got, tc.want)
			}
			for a, n := range tc.want {
				if got[a] != n {
					t.Errorf("slots %v; want %v", got, tc.want)
					break
				}
			}
		})
	}
	if _, _, ok, _ := apportion([]candidate{{addr: ep(1), priority: 1, weight: 1}}, func(netip.AddrPort) bool { return true }); ok {
		t.Errorf("apportion with every endpoint dead: ok")
	}
	var many []candidate
	for i := range maxEndpoints + 1 {
		many = append(many, candidate{addr: ep(i), priority: 1, target: i, weight: 1})
	}
	if _, _, _, err := apportion(many, none); err == nil {
		t.Errorf("apportion of %d endpoints in one group: no error", len(many))
	}
}

func TestEndpointRoundTrip(t *testing.T) {
	for _, s := range []string{"198.18.0.1:80", "[fd00::1]:65535", "10.0.0.1:1"} {
		ap := netip.MustParseAddrPort(s)
		if got := endpoint(ap).addrPort(); got != ap {
			t.Errorf("endpoint(%s).addrPort() = %s", ap, got)
		}
	}
}
