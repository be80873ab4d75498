package admin

import (
	"fmt"
	"net/http"
	"net/netip"
	"strings"
	"testing"

	"github.com/connectable/connectable/proxy"
	"github.com/connectable/connectable/sockpath"
)

func TestBoundEndpoints(t *testing.T) {
	s := func(svc, ep string, v float64) endpointSample { return endpointSample{svc, ep, []float64{v, 2 * v}} }
	cases := []struct {
		name              string
		in                []endpointSample
		perService, total int
		want              []endpointSample
	}{
		{"under the caps", []endpointSample{s("b", "2", 1), s("a", "1", 1)}, 2, 10,
			[]endpointSample{s("a", "1", 1), s("b", "2", 1)}},
		{"per service", []endpointSample{s("a", "3", 3), s("a", "1", 1), s("a", "2", 2), s("b", "1", 5)}, 1, 10,
			[]endpointSample{s("a", "1", 1), s("a", "other", 5), s("b", "1", 5)}},
		{"in all", []endpointSample{s("a", "1", 1), s("a", "2", 2), s("b", "1", 4), s("b", "2", 8)}, 10, 3,
			[]endpointSample{s("a", "1", 1), s("a", "2", 2), s("b", "1", 4), s("b", "other", 8)}},
		{"in all, a whole service", []endpointSample{s("a", "1", 1), s("b", "1", 4), s("b", "2", 8)}, 10, 1,
			[]endpointSample{s("a", "1", 1), s("b", "other", 12)}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := boundEndpoints(tc.in, tc.perService, tc.total)
			if fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Errorf("got %v; want %v", got, tc.want)
			}
		})
	}
}

// A tenant whose label names a DNS zone it controls answers with as many
// endpoints as it likes; /metrics stays bounded.
type floodProxy struct{ fakeProxy }

func (floodProxy) Stats() proxy.Stats {
	st := fakeProxy{}.Stats()
	st.DialFailures = map[netip.AddrPort]uint64{}
	for i := range 5000 {
		st.DialFailures[netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)}), 80)] = 1
	}
	return st
}

type floodSocket struct{ fakeSocket }

func (floodSocket) Counters() ([]sockpath.ServiceCounter, error) {
	out := []sockpath.ServiceCounter{{Service: "web", Endpoint: netip.MustParseAddrPort("198.18.0.5:80"), Connects: 9, Failures: 1}}
	for i := range 5000 {
		out = append(out, sockpath.ServiceCounter{Service: "evil.zone", Connects: 2, Failures: 1,
			Endpoint: netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 19, byte(i >> 8), byte(i)}), 80)})
	}
	return out, nil
}

func TestMetricsEndpointSeriesBounded(t *testing.T) {
	a := New(Config{Version: "v1", Proxy: floodProxy{}, Reconciler: fakeReconciler{}, Socket: floodSocket{}})
	_, page := get(t, a, http.MethodGet, "/metrics")
	count := func(prefix string) int {
		n := 0
		for _, l := range strings.Split(page, "\n") {
			if strings.HasPrefix(l, prefix) {
				n++
			}
		}
		return n
	}
	if n := count(`connectable_socket_connects_total{endpoint=`); n != maxEndpointSeriesPerService+2 {
		t.Errorf("%d socket_connects series; want %d: web's one, evil.zone's %d and its other", n, maxEndpointSeriesPerService+2, maxEndpointSeriesPerService)
	}
	if n := count(`connectable_dial_failures_total{`); n != maxEndpointSeries+1 {
		t.Errorf("%d dial_failures series; want %d and other", n, maxEndpointSeries)
	}
	for _, want := range []string{
		`connectable_socket_connects_total{endpoint="198.18.0.5:80",service="web"} 9`,
		fmt.Sprintf(`connectable_socket_connects_total{endpoint="other",service="evil.zone"} %d`, 2*(5000-maxEndpointSeriesPerService)),
		fmt.Sprintf(`connectable_socket_failures_total{endpoint="other",service="evil.zone"} %d`, 5000-maxEndpointSeriesPerService),
		fmt.Sprintf(`connectable_dial_failures_total{endpoint="other"} %d`, 5000-maxEndpointSeries),
	} {
		if !strings.Contains(page, want+"\n") {
			t.Errorf("/metrics lacks %s", want)
		}
	}
}
