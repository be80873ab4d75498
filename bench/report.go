package main

import (
	"fmt"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"time"
)

// Targets of issue 7.
const (
	targetNewConn   = 1.10 // × the better of HAProxy and nginx
	targetKeepAlive = 1.05 // × the better of HAProxy and nginx
	targetBulk      = 0.80 // × direct
	targetIdleKiB   = 9.0
	targetSetupMed  = 50 * time.Millisecond
	targetSetupMax  = 200 * time.Millisecond
	targetBurst     = 10 * time.Second
)

// Targets of the socket data path (issue 14): the kernel hands the
// application's own connection to the endpoint, so it should cost next to
// nothing over direct.
const (
	targetSocketRatio    = 0.95 // × direct, for new connections, keep-alive and bulk
	targetSocketIdleKiB  = 0.5  // daemon growth per idle connection: noise, not a relay
	targetSocketSetupMed = 5 * time.Millisecond
)

// row is one line of the main table.
type row struct {
	title  string
	s      series
	format string
	skip   map[string]bool // contenders without a value by nature
}

func (b *bench) report() string {
	var w strings.Builder
	now := time.Now()
	host, _ := os.Hostname()
	mode := "full"
	if b.cfg.quick {
		mode = "quick"
	}
	fmt.Fprintf(&w, "# connectable benchmark, %s\n\n", now.Format("2006-01-02 15:04 MST"))
	fmt.Fprintf(&w, "- Machine: %s, %d CPUs (%s), kernel %s\n", host, runtime.NumCPU(), cpuModel(), strings.TrimSpace(readFile("/proc/sys/kernel/osrelease")))
	fmt.Fprintf(&w, "- Load average (1, 5, 15 min): %s before, %s after\n", b.loadBefore, b.loadAfter)
	fmt.Fprintf(&w, "- Mode: %s: %d rounds (contenders interleaved, order rotated each round), ab %v, wrk %v, iperf3 %v (+1 s omitted) per run; %d idle connections; set-up %d one by one, %d at once\n",
		mode, b.cfg.rounds, b.cfg.abDur, b.cfg.wrkDur, b.cfg.iperfDur, b.cfg.conns, b.cfg.seq, b.cfg.burst)
	fmt.Fprintf(&w, "- Command: `%s`; took %v\n", strings.Join(os.Args, " "), b.elapsed.Round(time.Second))
	fmt.Fprintf(&w, "- Client: ab, wrk and iperf3 of the host, run with nsenter in the network namespace of a labelled busybox container (--network none plus one veth to the backend namespace, and a route over it to the endpoints' /30)\n")
	var ps []string
	for _, pr := range b.runs {
		ps = append(ps, fmt.Sprintf("**%s**: the daemon %s (took %v, load %s before, %s after)",
			pr.placement, placementWhere(pr.placement), pr.elapsed.Round(time.Second), pr.loadBefore, pr.loadAfter))
	}
	fmt.Fprintf(&w, "- Daemon placements, one after the other, each with a world of its own and every contender measured in each: %s\n\n", strings.Join(ps, "; "))
	for _, pr := range b.runs {
		w.WriteString(b.placementReport(pr))
	}
	w.WriteString("## Versions\n\n| Program | Version |\n|---|---|\n")
	for _, v := range b.versions {
		fmt.Fprintf(&w, "| %s | %s |\n", v[0], v[1])
	}
	return w.String()
}

// placementReport is the tables of one placement of the daemon; each
// heading names the placement.
func (b *bench) placementReport(pr *placementRun) string {
	var w strings.Builder
	res := &pr.res
	at := fmt.Sprintf("daemon placement %s", pr.placement)
	fmt.Fprintf(&w, "## Results, %s\n\nThe daemon %s; load average %s before, %s after. Median (min–max) over the rounds; × = ratio of medians to direct.\n\n",
		at, placementWhere(pr.placement), pr.loadBefore, pr.loadAfter)
	names := []string{}
	for _, c := range pr.contenders {
		names = append(names, c.name)
	}
	fmt.Fprintf(&w, "| Workload | %s |\n|---|%s\n", strings.Join(names, " | "), strings.Repeat("---:|", len(names)))
	direct := map[string]bool{"direct": true}
	rows := []row{
		{"New connection per request (ab -c 20), req/s", res.abRPS, "%.0f", nil},
		{"Keep-alive (wrk -c 50), req/s", res.wrkRPS, "%.0f", nil},
		{"Keep-alive latency p50, ms", res.wrkP50, "%.2f", nil},
		{"Keep-alive latency p99, ms", res.wrkP99, "%.2f", nil},
		{"Bulk (iperf3, 1 stream), Gbit/s", res.iperfGbps, "%.2f", nil},
		{fmt.Sprintf("Idle connection, proxy's growth, KiB Pss each (%d held)", b.cfg.conns), res.memPSS, "%.1f", direct},
		{"Idle connection, proxy's growth, KiB Rss each", res.memRSS, "%.1f", direct},
	}
	for _, r := range rows {
		if len(r.s) == 0 {
			continue
		}
		cells := []string{}
		dm := median(r.s["direct"])
		for _, n := range names {
			v := r.s[n]
			switch {
			case r.skip[n]:
				cells = append(cells, "n/a")
			case len(v) == 0:
				cells = append(cells, "failed")
			default:
				m := median(v)
				cell := fmt.Sprintf(r.format, m)
				if len(v) > 1 {
					lo, hi := minMax(v)
					cell += fmt.Sprintf(" ("+r.format+"–"+r.format+")", lo, hi)
				}
				if n != "direct" && dm > 0 {
					cell += fmt.Sprintf(" %.2f×", m/dm)
				}
				cells = append(cells, cell)
			}
		}
		fmt.Fprintf(&w, "| %s | %s |\n", r.title, strings.Join(cells, " | "))
	}
	w.WriteString("\n")

	var seqNames []string
	for _, c := range pr.contenders {
		if len(res.seq[c.name]) > 0 {
			seqNames = append(seqNames, c.name)
		}
	}
	if len(seqNames) > 0 {
		fmt.Fprintf(&w, "## Set-up latency, %s\n\n| Measure | %s |\n|---|%s\n", at, strings.Join(seqNames, " | "), strings.Repeat("---:|", len(seqNames)))
		cells := func(f func(s []time.Duration) string) string {
			var out []string
			for _, n := range seqNames {
				out = append(out, f(sortedDurations(res.seq[n])))
			}
			return strings.Join(out, " | ")
		}
		fmt.Fprintf(&w, "| containers one by one: docker run returned → first request served, median | %s |\n", cells(func(s []time.Duration) string { return ms(durMedian(s)) }))
		fmt.Fprintf(&w, "| … p90 | %s |\n", cells(func(s []time.Duration) string { return ms(pct(s, 0.9)) }))
		fmt.Fprintf(&w, "| … worst | %s |\n| … best | %s |\n", cells(func(s []time.Duration) string { return ms(s[len(s)-1]) }),
			cells(func(s []time.Duration) string { return ms(s[0]) }))
		fmt.Fprintf(&w, "| … served | %s |\n", cells(func(s []time.Duration) string { return fmt.Sprintf("%d of %d", len(s), b.cfg.seq) }))
		if len(res.seqSocket) > 0 {
			s := sortedDurations(res.seqSocket)
			var out []string
			for _, n := range seqNames {
				if n == socketContender {
					out = append(out, fmt.Sprintf("%s / %s", ms(durMedian(s)), ms(pct(s, 0.9))))
				} else {
					out = append(out, "n/a")
				}
			}
			fmt.Fprintf(&w, "| … until the first request the socket path served (not the relay beneath), median / p90 | %s |\n", strings.Join(out, " | "))
		}
		w.WriteString("\n")
	}
	if br := res.burst; br != nil {
		fmt.Fprintf(&w, "## Many containers at once (connectable, relay), %s\n\n| Measure | Value |\n|---|---:|\n", at)
		fmt.Fprintf(&w, "| %d containers started at once: first start call → all served | %s (%d of %d served) |\n", br.n, sec(br.allServed), br.served, br.n)
		fmt.Fprintf(&w, "| … of which the engine took to start them all | %s |\n", sec(br.allStarted))
		if len(br.lag) > 0 {
			fmt.Fprintf(&w, "| … each container: its start returned → first request served, median / worst | %s / %s |\n",
				ms(durMedian(br.lag)), ms(br.lag[len(br.lag)-1]))
		}
		w.WriteString("\n")
	}

	w.WriteString(b.targets(pr))

	fmt.Fprintf(&w, "## Contenders, %s\n\n", at)
	for _, c := range pr.contenders {
		fmt.Fprintf(&w, "- **%s**: %s\n", c.name, c.config())
	}
	daemonNS := "a namespace of its own"
	if pr.placement == placementHost {
		daemonNS = "the machine's namespace, over the run's one veth there"
	}
	fmt.Fprintf(&w, "- backend: nginx (worker_processes auto, no access log, keep-alive without a request limit) returning a fixed %d-byte body; iperf3 -s; all in a namespace of their own, one veth hop from the client namespace (direct, HAProxy, nginx, connectable socket) and from the daemon's namespace, %s (the relay dials from there)\n\n", bodySize, daemonNS)

	fmt.Fprintf(&w, "## Commands, %s\n\n", at)
	for _, c := range res.commands {
		fmt.Fprintf(&w, "- `%s`\n", strings.ReplaceAll(c, "`", "'"))
	}
	if len(res.notes) > 0 {
		fmt.Fprintf(&w, "\n## Notes, %s\n\n", at)
		for _, n := range res.notes {
			fmt.Fprintf(&w, "- %s\n", n)
		}
	}
	fmt.Fprintf(&w, "\n## Raw values, %s (per round, in round order)\n\n", at)
	for _, r := range rows {
		if len(r.s) == 0 {
			continue
		}
		fmt.Fprintf(&w, "- %s:", r.title)
		for _, n := range names {
			if v := r.s[n]; len(v) > 0 {
				parts := []string{}
				for _, x := range v {
					parts = append(parts, fmt.Sprintf(r.format, x))
				}
				fmt.Fprintf(&w, " %s [%s]", n, strings.Join(parts, " "))
			}
		}
		w.WriteString("\n")
	}
	for _, n := range names {
		if v := res.seq[n]; len(v) > 0 {
			parts := []string{}
			for _, d := range v {
				parts = append(parts, ms(d))
			}
			fmt.Fprintf(&w, "- set-up one by one through %s, in start order: %s\n", n, strings.Join(parts, " "))
		}
	}
	if len(res.seqSocket) > 0 {
		parts := []string{}
		for _, d := range res.seqSocket {
			parts = append(parts, ms(d))
		}
		fmt.Fprintf(&w, "- set-up one by one through %s, until the socket path served, in start order: %s\n", socketContender, strings.Join(parts, " "))
	}
	w.WriteString("\n")
	return w.String()
}

// targets checks issue 7's targets against one placement's medians.
func (b *bench) targets(pr *placementRun) string {
	var w strings.Builder
	res := &pr.res
	fmt.Fprintf(&w, "## Targets, daemon placement %s\n\n| Target | Measured | Result |\n|---|---|---|\n", pr.placement)
	line := func(target, measured string, ok bool) {
		res := "MISS"
		if ok {
			res = "pass"
		}
		fmt.Fprintf(&w, "| %s | %s | %s |\n", target, measured, res)
	}
	vsBest := func(s series, what string, want float64) {
		c := median(s["connectable"])
		h, n := median(s["HAProxy"]), median(s["nginx"])
		best, name := h, "HAProxy"
		if n > h {
			best, name = n, "nginx"
		}
		if c == 0 || best == 0 {
			line(fmt.Sprintf("%s ≥ %.2f× the better of HAProxy and nginx", what, want), "no data", false)
			return
		}
		line(fmt.Sprintf("%s ≥ %.2f× the better of HAProxy and nginx", what, want),
			fmt.Sprintf("%.2f× (connectable %.0f, %s %.0f req/s)", c/best, c, name, best), c/best >= want)
	}
	if len(res.abRPS) > 0 {
		vsBest(res.abRPS, "New connection per request", targetNewConn)
	}
	if len(res.wrkRPS) > 0 {
		vsBest(res.wrkRPS, "Keep-alive", targetKeepAlive)
	}
	if len(res.iperfGbps) > 0 {
		c, d := median(res.iperfGbps["connectable"]), median(res.iperfGbps["direct"])
		r := 0.0
		if d > 0 {
			r = c / d
		}
		line(fmt.Sprintf("Bulk ≥ %.2f× direct", targetBulk), fmt.Sprintf("%.2f× (%.2f of %.2f Gbit/s)", r, c, d), r >= targetBulk)
	}
	if v := res.memPSS["connectable"]; len(v) > 0 {
		m := median(v)
		line(fmt.Sprintf("Idle relayed connection ≤ %.0f KiB", targetIdleKiB), fmt.Sprintf("%.1f KiB Pss (%.1f KiB Rss)", m, median(res.memRSS["connectable"])), m <= targetIdleKiB)
	}
	if seq := res.seq["connectable"]; len(seq) > 0 {
		s := sortedDurations(seq)
		line(fmt.Sprintf("Set-up median ≤ %s", ms(targetSetupMed)), ms(durMedian(s)), durMedian(s) <= targetSetupMed && len(seq) == b.cfg.seq)
		line(fmt.Sprintf("Set-up worst ≤ %s", ms(targetSetupMax)), ms(s[len(s)-1]), s[len(s)-1] <= targetSetupMax && len(seq) == b.cfg.seq)
	}
	if br := res.burst; br != nil {
		line(fmt.Sprintf("%d containers at once all served ≤ %s", br.n, sec(targetBurst)),
			fmt.Sprintf("%s (the engine's part: %s)", sec(br.allServed), sec(br.allStarted)), br.served == br.n && br.allServed <= targetBurst)
	}
	w.WriteString("\n")
	if b.cfg.contenders[socketContender] {
		w.WriteString(b.socketTargets(pr))
	}
	return w.String()
}

// socketTargets checks the socket data path's targets against one
// placement's medians.
func (b *bench) socketTargets(pr *placementRun) string {
	var w strings.Builder
	res := &pr.res
	fmt.Fprintf(&w, "### connectable socket (issue 14), daemon placement %s\n\n| Target | Measured | Result |\n|---|---|---|\n", pr.placement)
	line := func(target, measured string, ok bool) {
		res := "MISS"
		if ok {
			res = "pass"
		}
		fmt.Fprintf(&w, "| %s | %s | %s |\n", target, measured, res)
	}
	vsDirect := func(s series, what, unit, format string) {
		if len(s) == 0 {
			return
		}
		c, d := median(s[socketContender]), median(s["direct"])
		target := fmt.Sprintf("%s ≥ %.2f× direct", what, targetSocketRatio)
		if c == 0 || d == 0 {
			line(target, "no data", false)
			return
		}
		line(target, fmt.Sprintf("%.2f× ("+format+" of "+format+" %s)", c/d, c, d, unit), c/d >= targetSocketRatio)
	}
	vsDirect(res.abRPS, "New connection per request", "req/s", "%.0f")
	vsDirect(res.wrkRPS, "Keep-alive", "req/s", "%.0f")
	vsDirect(res.iperfGbps, "Bulk", "Gbit/s", "%.2f")
	if v := res.memPSS[socketContender]; len(v) > 0 {
		m, relayed := median(v), res.memRelayed[socketContender]
		line(fmt.Sprintf("No relay memory per idle connection: none relayed, daemon growth ≤ %.1f KiB each", targetSocketIdleKiB),
			fmt.Sprintf("%d of %d relayed; %.2f KiB Pss (%.2f KiB Rss) each", relayed, b.cfg.conns, m, median(res.memRSS[socketContender])),
			relayed == 0 && m <= targetSocketIdleKiB)
	}
	if seq := res.seq[socketContender]; len(seq) > 0 {
		s := sortedDurations(seq)
		line(fmt.Sprintf("docker run → first request served, median ≤ %s", ms(targetSocketSetupMed)),
			fmt.Sprintf("%s (p90 %s)", ms(durMedian(s)), ms(pct(s, 0.9))), durMedian(s) <= targetSocketSetupMed && len(seq) == b.cfg.seq)
		if len(res.seqSocket) > 0 {
			ss := sortedDurations(res.seqSocket)
			line(fmt.Sprintf("… first request through the socket path itself, median ≤ %s", ms(targetSocketSetupMed)),
				fmt.Sprintf("%s (p90 %s)", ms(durMedian(ss)), ms(pct(ss, 0.9))), durMedian(ss) <= targetSocketSetupMed && len(ss) == b.cfg.seq)
		}
	}
	w.WriteString("\n")
	return w.String()
}

func (b *bench) writeReport(report string) (string, error) {
	if err := os.MkdirAll(b.cfg.outDir, 0o755); err != nil {
		return "", err
	}
	name := time.Now().Format("2006-01-02-150405")
	if b.cfg.quick {
		name += "-quick"
	}
	path := filepath.Join(b.cfg.outDir, name+".md")
	return path, os.WriteFile(path, []byte(report), 0o644)
}

func sortedDurations(d []time.Duration) []time.Duration {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s
}

// durMedian is the median of sorted durations.
func durMedian(s []time.Duration) time.Duration {
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// pct is the p-quantile of sorted durations, the nearest rank.
func pct(s []time.Duration, p float64) time.Duration {
	i := int(math.Ceil(p*float64(len(s)))) - 1
	return s[max(0, min(i, len(s)-1))]
}

func ms(d time.Duration) string  { return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond)) }
func sec(d time.Duration) string { return fmt.Sprintf("%.2f s", d.Seconds()) }
