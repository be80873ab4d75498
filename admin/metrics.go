package admin

import (
	"cmp"
	"slices"

	"github.com/prometheus/client_golang/prometheus"
)

// collector turns snapshots of the proxy's, resolver's and watcher's
// counters into metrics at scrape time. Labels are services and endpoints,
// never connections or containers. Services are bounded by what the labels
// of running containers name; endpoints are what DNS answers, which a
// tenant naming a zone it controls decides, so their series are capped
// (see boundEndpoints).
type collector struct{ a *Admin }

// Caps of the per-endpoint series: beyond them, a service's further
// endpoints are added up in one series of endpoint="other". 64 is what one
// answer may bring (the socket path's table size).
const (
	maxEndpointSeriesPerService = 64
	maxEndpointSeries           = 1024
	otherEndpoint               = "other"
)

// endpointSample is one endpoint's values of one metric family.
type endpointSample struct {
	service, endpoint string
	values            []float64
}

// boundEndpoints keeps at most perService samples of each service and
// total in all, choosing by service and endpoint in order (so that the
// same endpoints keep their series from one scrape to the next), and adds
// up the rest of each service into one sample with endpoint "other".
func boundEndpoints(in []endpointSample, perService, total int) []endpointSample {
	slices.SortFunc(in, func(a, b endpointSample) int {
		return cmp.Or(cmp.Compare(a.service, b.service), cmp.Compare(a.endpoint, b.endpoint))
	})
	var out []endpointSample
	kept := map[string]int{}
	other := map[string]int{} // service → index in out
	n := 0
	for _, s := range in {
		if kept[s.service] < perService && n < total {
			kept[s.service]++
			n++
			out = append(out, s)
			continue
		}
		i, ok := other[s.service]
		if !ok {
			i = len(out)
			other[s.service] = i
			out = append(out, endpointSample{service: s.service, endpoint: otherEndpoint, values: make([]float64, len(s.values))})
		}
		for j, v := range s.values {
			out[i].values[j] += v
		}
	}
	return out
}

func desc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc("connectable_"+name, help, labels, nil)
}

var (
	buildInfo      = desc("build_info", "Version of the running connectable; always 1.", "version")
	accepted       = desc("connections_accepted_total", "Client connections routed to a service.", "service")
	active         = desc("connections_active", "Client connections being dialled or relayed now.", "service")
	failed         = desc("connections_failed_total", "Client connections closed because no endpoint of the service connected.", "service")
	rejected       = desc("connections_rejected_total", "Connections closed without a dial: straight to the proxy port, or to a port without a route.")
	bytesTotal     = desc("bytes_total", "Bytes relayed by finished connections; direction up is client to backend.", "service", "direction")
	dialFailures   = desc("dial_failures_total", "Failed connection attempts per endpoint (endpoints forgotten after a quiet while drop out; beyond 1024 endpoints, the rest in endpoint=\"other\").", "endpoint")
	refusedTargets = desc("targets_refused_total", "Endpoints the target policy refused to dial (loopback, link-local, --deny-targets...), once per connection that met one.", "service")
	limited        = desc("connections_limited_total", "Connections reset at accept because their namespace (scope namespace) or the whole daemon (scope global) was at its connection cap.", "scope")
	failovers      = desc("failovers_total", "Connections relayed to an endpoint after another one failed to connect.")
	namespaces     = desc("namespaces", "Network namespaces with a listener and rules.")
	ports          = desc("ports", "Labelled ports served, over all namespaces.")
	dnsLookups     = desc("dns_lookups_total", "Resolver lookups by how they were answered: hit (from the cache, stale answers included), miss (queried), shared (waited for another lookup's query).", "result")
	dnsStale       = desc("dns_stale_answers_total", "Lookups answered with an expired answer because every DNS server failed.")
	dnsQueries     = desc("dns_queries_total", "DNS exchanges with a server (one per server tried; UDP and TCP apart).")
	dnsErrors      = desc("dns_query_errors_total", "DNS exchanges that failed: timeout, network error, SERVFAIL, REFUSED, malformed reply.")
	dnsTruncated   = desc("dns_truncated_total", "UDP replies truncated and retried over TCP.")
	dnsSeconds     = desc("dns_query_seconds_total", "Total time spent in DNS exchanges; divide by dns_queries_total for the mean latency.")
	dockerUp       = desc("docker_stream_up", "1 while the Docker event stream is up and the last resync succeeded.")
	dockerReconn   = desc("docker_reconnects_total", "Docker event-stream subscriptions after the first.")
	dockerResyncs  = desc("docker_resyncs_total", "Full resynchronisations with the Docker Engine.")
	dockerResyncKO = desc("docker_resync_errors_total", "Full resynchronisations that failed.")
	sockConnects   = desc("socket_connects_total", "Connects the socket path's programs sent straight to an endpoint, as counted in the kernel (reset when the endpoint leaves the service; beyond 64 endpoints of a service or 1024 in all, the rest in endpoint=\"other\").", "service", "endpoint")
	sockFailures   = desc("socket_failures_total", "Of those, the ones that failed through the remote side (a reset, an ICMP error, an unanswered SYN); each takes the endpoint out of its own namespace's choices, and out of every namespace's once the daemon's probe confirms it.", "service", "endpoint")
	sockPorts      = desc("socket_ports", "Labelled ports, per family, by the data path that serves them.", "path")
	sockEvidence   = desc("socket_evidence_total", "Connects rewritten by the socket path that failed through the remote side (a reset, an ICMP error, an unanswered SYN), as the kernel reported them.")
	sockLocal      = desc("socket_local_aborts_total", "Rewritten connects the application closed or aborted itself while connecting: never evidence against the endpoint.")
	sockDropped    = desc("socket_reports_dropped_total", "Failure reports not acted on: over_budget (the namespace's report budget in the kernel), ringbuf_full, over_marks (the namespace holds too many suspects), unreadable.", "reason")
	sockMapFull    = desc("socket_map_full_total", "Kernel map updates lost because the map was full.", "map")
	sockNoStorage  = desc("socket_no_storage_total", "Connects left to the relay because no socket storage could be had.")
	sockPassiveCap = desc("socket_passive_cap_total", "Picks that ignored a namespace's own failure marks because they covered more than half of a table.")
	sockV6Only     = desc("socket_v6only_refused_total", "Connects to ::1 left to the relay rather than sent to an IPv4 endpoint.")
	sockCleared    = desc("socket_state_cleared_total", "Socket states dropped because a later connect on the same socket was not rewritten.")
	sockUnbounded  = desc("socket_unbounded_total", "Established rewritten connections left without the --backend-timeout bound, because the kernel could not read the application's own socket options (Linux before 6.1).")
	setupSeconds   = desc("setup_seconds", "Time to set up or update one network namespace on every data path (listeners, iptables rules, routes).")
)

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{buildInfo, accepted, active, failed, rejected, bytesTotal, dialFailures, refusedTargets, limited,
		failovers, namespaces, ports, dnsLookups, dnsStale, dnsQueries, dnsErrors, dnsTruncated, dnsSeconds,
		dockerUp, dockerReconn, dockerResyncs, dockerResyncKO, sockConnects, sockFailures, sockPorts, sockEvidence, sockLocal, sockDropped, sockMapFull, sockNoStorage, sockPassiveCap,
		sockV6Only, sockCleared, sockUnbounded, setupSeconds} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	gauge(buildInfo, 1, c.a.cfg.Version)
	if p := c.a.cfg.Proxy; p != nil {
		st := p.Stats()
		for svc, s := range st.Services {
			counter(accepted, float64(s.Accepted), svc)
			gauge(active, float64(s.Active), svc)
			counter(failed, float64(s.Failed), svc)
			counter(refusedTargets, float64(s.Refused), svc)
			counter(bytesTotal, float64(s.BytesUp), svc, "up")
			counter(bytesTotal, float64(s.BytesDown), svc, "down")
		}
		var fails []endpointSample
		for ep, n := range st.DialFailures {
			fails = append(fails, endpointSample{endpoint: ep.String(), values: []float64{float64(n)}})
		}
		for _, s := range boundEndpoints(fails, maxEndpointSeries, maxEndpointSeries) {
			counter(dialFailures, s.values[0], s.endpoint)
		}
		counter(failovers, float64(st.Failovers))
		counter(rejected, float64(st.Rejected))
		counter(limited, float64(st.LimitedNamespace), "namespace")
		counter(limited, float64(st.LimitedGlobal), "global")
		nss := p.Namespaces()
		gauge(namespaces, float64(len(nss)))
		n := 0
		for _, ns := range nss {
			n += len(ns.Routes)
		}
		gauge(ports, float64(n))
	}
	if r := c.a.cfg.Resolver; r != nil {
		st := r.Stats()
		counter(dnsLookups, float64(st.CacheHits), "hit")
		counter(dnsLookups, float64(st.CacheMisses), "miss")
		counter(dnsLookups, float64(st.Shared), "shared")
		counter(dnsStale, float64(st.StaleServed))
		counter(dnsQueries, float64(st.Queries))
		counter(dnsErrors, float64(st.QueryErrors))
		counter(dnsTruncated, float64(st.Truncated))
		counter(dnsSeconds, st.QueryTime.Seconds())
	}
	if w := c.a.cfg.Watcher; w != nil {
		up := 0.0
		if w.Healthy() {
			up = 1
		}
		gauge(dockerUp, up)
		st := w.Stats()
		counter(dockerReconn, float64(st.Reconnects))
		counter(dockerResyncs, float64(st.Resyncs))
		counter(dockerResyncKO, float64(st.ResyncErrors))
	}
	if sp := c.a.cfg.Socket; sp != nil {
		if cs, err := sp.Counters(); err == nil {
			samples := make([]endpointSample, 0, len(cs))
			for _, s := range cs {
				samples = append(samples, endpointSample{s.Service, s.Endpoint.String(), []float64{float64(s.Connects), float64(s.Failures)}})
			}
			for _, s := range boundEndpoints(samples, maxEndpointSeriesPerService, maxEndpointSeries) {
				counter(sockConnects, s.values[0], s.service, s.endpoint)
				counter(sockFailures, s.values[1], s.service, s.endpoint)
			}
		} else {
			c.a.log.Warn("reading the socket path's counters", "err", err)
		}
		if ks, err := sp.KernelStats(); err == nil {
			counter(sockEvidence, float64(ks.Evidence))
			counter(sockLocal, float64(ks.LocalClose))
			counter(sockDropped, float64(ks.OverBudget), "over_budget")
			counter(sockDropped, float64(ks.RingbufFull), "ringbuf_full")
			counter(sockDropped, float64(ks.OverMarks), "over_marks")
			counter(sockDropped, float64(ks.BadReports), "unreadable")
			counter(sockMapFull, float64(ks.DeadMapFull), "dead")
			counter(sockMapFull, float64(ks.CountersFull), "counters")
			counter(sockNoStorage, float64(ks.NoStorage))
			counter(sockPassiveCap, float64(ks.PassiveCap))
			counter(sockV6Only, float64(ks.V6OnlyRefused))
			counter(sockCleared, float64(ks.Cleared))
			counter(sockUnbounded, float64(ks.Unbounded))
		} else {
			c.a.log.Warn("reading the socket path's kernel counts", "err", err)
		}
		n := map[string]int{"socket": 0, "relay": 0}
		for _, s := range sp.Status() {
			n[s.Path]++
		}
		for path, v := range n {
			gauge(sockPorts, float64(v), path)
		}
	}
	if r := c.a.cfg.Reconciler; r != nil {
		h := r.SetupTimes()
		buckets := make(map[float64]uint64, len(h.Bounds))
		for i, b := range h.Bounds {
			buckets[b] = h.Counts[i]
		}
		ch <- prometheus.MustNewConstHistogram(setupSeconds, h.Count, h.Sum, buckets)
	}
}
