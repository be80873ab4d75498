package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"regexp"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/connectable/connectable/netns"
)

// series holds one metric's values per contender, one per round.
type series map[string][]float64

func (s series) add(contender string, v float64) { s[contender] = append(s[contender], v) }

// results is everything one run measured.
type results struct {
	abRPS, wrkRPS, wrkP50, wrkP99, iperfGbps series
	memPSS, memRSS                           series         // KiB per held connection
	memRelayed                               map[string]int // held connections the holder saw come from the relay
	socketShort                              []string       // socket runs where the kernel counted fewer connects than ab made
	notes                                    []string
	commands                                 []string

	seq       map[string][]time.Duration // set-up latency of containers started one by one, by contender
	seqSocket []time.Duration            // the same until the first request the socket path served
	burst     *burstResult
}

type burstResult struct {
	n, served  int
	allStarted time.Duration // from the first start call to the last one's return
	allServed  time.Duration // from the first start call to the last first request
	lag        []time.Duration
}

func (b *bench) note(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	logf("note: %s", msg)
	b.res.notes = append(b.res.notes, msg)
}

// inClient prefixes argv so it runs in the client container's namespace.
func (b *bench) inClient(argv ...string) []string {
	return append([]string{"nsenter", "--net=" + b.clientNS}, argv...)
}

// memory measures each proxy's memory growth (Pss and Rss of all its
// processes) with conns idle connections held open through it. Each
// connection has carried one byte from the backend, so it is relayed end to
// end. It runs first, on fresh processes, once per proxy.
func (b *bench) memory(ctx context.Context) error {
	n := b.cfg.conns
	b.res.memPSS, b.res.memRSS, b.res.memRelayed = series{}, series{}, map[string]int{}
	for _, c := range b.contenders {
		if c.pids == nil {
			continue
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := b.prepare(ctx, c); err != nil {
			return err
		}
		logf("memory: holding %d idle connections through %s", n, c.name)
		rss0, pss0 := memory(c.pids())
		conns, err := holdConns(b.clientNS, c.hold, n)
		if err == nil {
			err = waitFor(ctx, 20*time.Second, func() bool { return b.hold.count() >= n })
			if err != nil {
				err = fmt.Errorf("the holder sees %d of %d connections", b.hold.count(), n)
			}
		}
		if err != nil {
			b.note("memory through %s: %v", c.name, err)
		} else {
			// Let deferred work settle (Go's background scavenger, nginx's
			// and HAProxy's pools) so the sample is the steady state.
			time.Sleep(2 * time.Second)
			rss1, pss1 := memory(c.pids())
			b.res.memPSS.add(c.name, (pss1-pss0)/float64(n))
			b.res.memRSS.add(c.name, (rss1-rss0)/float64(n))
			relayed := b.hold.from(hostAddr)
			b.res.memRelayed[c.name] = relayed
			logf("memory: %s grew by %.0f KiB Pss, %.0f KiB Rss; %d of %d held connections came from the relay", c.name, pss1-pss0, rss1-rss0, relayed, n)
		}
		for _, c := range conns {
			c.Close()
		}
		if err := waitFor(ctx, 30*time.Second, func() bool { return b.hold.count() == 0 }); err != nil {
			return fmt.Errorf("%d held connections through %s still open 30s after the client closed them", b.hold.count(), c.name)
		}
	}
	b.res.commands = append(b.res.commands, fmt.Sprintf(
		"memory: %d TCP connections opened one by one from the client namespace to each proxy's hold port, "+
			"each reads the backend's 1-byte greeting, then all stay idle; growth of the summed Pss/Rss "+
			"(/proc/<pid>/smaps_rollup) of the proxy's processes, sampled 2 s later, divided by %d", n, n))
	return nil
}

// holdConns opens n connections from inside ns to addr and waits for each
// one's greeting byte.
func holdConns(ns, addr string, n int) ([]net.Conn, error) {
	conns := make([]net.Conn, 0, n)
	err := netns.Do(ns, func() error {
		// Sockets take the namespace they are created in; this closure
		// only creates and uses them on its own locked thread.
		buf := make([]byte, 1)
		for i := 0; i < n; i++ {
			c, err := net.DialTimeout("tcp", addr, 5*time.Second)
			if err != nil {
				return fmt.Errorf("connection %d: %w", i+1, err)
			}
			conns = append(conns, c)
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
			if _, err := c.Read(buf); err != nil {
				return fmt.Errorf("connection %d: greeting: %w", i+1, err)
			}
			_ = c.SetReadDeadline(time.Time{})
		}
		return nil
	})
	return conns, err
}

func waitFor(ctx context.Context, timeout time.Duration, cond func() bool) error {
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			return fmt.Errorf("not within %v", timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(2 * time.Millisecond):
		}
	}
	return nil
}

// throughput runs ab, wrk and iperf3 against every contender, round by
// round, rotating the order each round so no contender always goes first
// (or always runs on a warmer machine).
func (b *bench) throughput(ctx context.Context) error {
	b.res.abRPS, b.res.wrkRPS, b.res.wrkP50, b.res.wrkP99, b.res.iperfGbps = series{}, series{}, series{}, series{}, series{}
	cpus := strconv.Itoa(runtime.NumCPU())
	abArgs := func(c contender) []string {
		// -t before -n: -t resets the request count, -n then lifts it so
		// the time limit ends the run.
		return []string{"ab", "-q", "-r", "-s", "10", "-c", "20", "-t", secs(b.cfg.abDur), "-n", "100000000", "http://" + c.web + "/"}
	}
	wrkArgs := func(c contender) []string {
		return []string{"wrk", "-t", cpus, "-c", "50", "-d", secs(b.cfg.wrkDur) + "s", "--timeout", "5s", "--latency", "http://" + c.web + "/"}
	}
	iperfArgs := func(c contender) []string {
		host, port, _ := net.SplitHostPort(c.iperf)
		return []string{"iperf3", "-c", host, "-p", port, "-t", secs(b.cfg.iperfDur), "-O", "1", "-J"}
	}
	ex := b.contenders[len(b.contenders)-1]
	if b.cfg.workloads["ab"] {
		b.res.commands = append(b.res.commands, "new connection per request: "+strings.Join(abArgs(ex), " "))
	}
	if b.cfg.workloads["wrk"] {
		b.res.commands = append(b.res.commands, "keep-alive: "+strings.Join(wrkArgs(ex), " "))
	}
	if b.cfg.workloads["iperf"] {
		b.res.commands = append(b.res.commands, "bulk: "+strings.Join(iperfArgs(ex), " ")+"  (iperf3 -s in the backend namespace)")
	}

	for r := 0; r < b.cfg.rounds; r++ {
		order := append(append([]contender(nil), b.contenders[r%len(b.contenders):]...), b.contenders[:r%len(b.contenders)]...)
		var names []string
		for _, c := range order {
			names = append(names, c.name)
		}
		logf("round %d of %d: %s", r+1, b.cfg.rounds, strings.Join(names, ", "))
		for _, w := range []struct {
			name string
			run  func(context.Context, contender) error
		}{
			{"ab", func(ctx context.Context, c contender) error { return b.runAb(ctx, c, abArgs(c)) }},
			{"wrk", func(ctx context.Context, c contender) error { return b.runWrk(ctx, c, wrkArgs(c)) }},
			{"iperf", func(ctx context.Context, c contender) error { return b.runIperf(ctx, c, iperfArgs(c)) }},
		} {
			if !b.cfg.workloads[w.name] {
				continue
			}
			for _, c := range b.fewerSwaps(order) {
				if err := b.measure(ctx, c, w.name, w.run); err != nil {
					return err
				}
			}
		}
		for _, c := range b.contenders {
			if p := procOf(c); p != nil && p.exited() {
				return fmt.Errorf("%s exited during round %d: %v", c.name, r+1, p.err)
			}
		}
	}
	return nil
}

// fewerSwaps puts the connectable contender whose daemon runs first of the
// two, so that each workload switches daemons once, not twice: the order of
// everything else stays as the rotation made it.
func (b *bench) fewerSwaps(order []contender) []contender {
	out := append([]contender(nil), order...)
	first := -1
	for i, c := range out {
		if c.daemon == "" {
			continue
		}
		if first < 0 {
			first = i
			continue
		}
		if c.daemon == b.daemonKind && out[first].daemon != b.daemonKind {
			out[first], out[i] = out[i], out[first]
		}
		break
	}
	return out
}

// measure runs one workload through c with c's daemon running. Through the
// socket daemon, the kernel's counter must grow by the connections the
// workload made: otherwise the relay beneath served them.
func (b *bench) measure(ctx context.Context, c contender, workload string, run func(context.Context, contender) error) error {
	if err := b.prepare(ctx, c); err != nil {
		return err
	}
	if c.daemon != socketDaemon {
		return run(ctx, c)
	}
	before, err := b.socketConnects(ctx)
	if err != nil {
		return err
	}
	b.abComplete = 0
	if err := run(ctx, c); err != nil {
		return err
	}
	after, err := b.socketConnects(ctx)
	if err != nil {
		return err
	}
	if after <= before {
		return fmt.Errorf("CONTENDER FAILED: %s through %s: connectable_socket_connects_total stayed at %.0f, so the relay served it", workload, c.name, before)
	}
	if workload == "ab" && after-before < float64(b.abComplete) {
		b.res.socketShort = append(b.res.socketShort, fmt.Sprintf("%.0f of %d", after-before, b.abComplete))
		b.note("ab through %s: the kernel sent %.0f of ab's %d connections straight to the endpoint", c.name, after-before, b.abComplete)
	}
	return nil
}

func secs(d time.Duration) string { return strconv.Itoa(int(d.Round(time.Second) / time.Second)) }

var (
	abRPSRe      = regexp.MustCompile(`Requests per second:\s+([0-9.]+)`)
	abCompleteRe = regexp.MustCompile(`Complete requests:\s+([0-9]+)`)
	abFailedRe   = regexp.MustCompile(`Failed requests:\s+([0-9]+)`)
	abNon2xxRe   = regexp.MustCompile(`Non-2xx responses:\s+([0-9]+)`)
	wrkRPSRe     = regexp.MustCompile(`Requests/sec:\s+([0-9.]+)`)
	wrkPctRe     = regexp.MustCompile(`(?m)^\s+(50|99)%\s+([0-9.]+)(us|ms|s|m)\s*$`)
	wrkErrRe     = regexp.MustCompile(`Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)`)
	wrkNon2xxRe  = regexp.MustCompile(`Non-2xx or 3xx responses:\s+(\d+)`)
)

// A failed run is a note in the report, not the end of the benchmark: one
// contender failing once should not cost the others' numbers. Only a
// cancelled context stops the run.
func (b *bench) runAb(ctx context.Context, c contender, args []string) error {
	out, err := commandTimeout(ctx, b.cfg.abDur+60*time.Second, b.inClient(args...)...)
	if ctx.Err() != nil {
		return ctx.Err()
	}
	m := abRPSRe.FindStringSubmatch(out)
	if err != nil || m == nil {
		b.note("ab through %s failed: %v %s", c.name, err, tail(out))
		return nil
	}
	rps, _ := strconv.ParseFloat(m[1], 64)
	complete := atoiMatch(abCompleteRe, out)
	b.abComplete = complete
	if bad := atoiMatch(abFailedRe, out) + atoiMatch(abNon2xxRe, out); bad > 0 {
		b.note("ab through %s: %d of %d requests failed or were not 2xx", c.name, bad, complete)
	}
	b.res.abRPS.add(c.name, rps)
	logf("  ab     %-18s %8.0f req/s", c.name, rps)
	return nil
}

func (b *bench) runWrk(ctx context.Context, c contender, args []string) error {
	out, err := commandTimeout(ctx, b.cfg.wrkDur+60*time.Second, b.inClient(args...)...)
	if ctx.Err() != nil {
		return ctx.Err()
	}
	m := wrkRPSRe.FindStringSubmatch(out)
	pcts := map[string]float64{}
	for _, p := range wrkPctRe.FindAllStringSubmatch(out, -1) {
		v, _ := strconv.ParseFloat(p[2], 64)
		pcts[p[1]] = v * map[string]float64{"us": 0.001, "ms": 1, "s": 1000, "m": 60000}[p[3]]
	}
	if err != nil || m == nil || len(pcts) != 2 {
		b.note("wrk through %s failed: %v %s", c.name, err, tail(out))
		return nil
	}
	if e := wrkErrRe.FindStringSubmatch(out); e != nil {
		b.note("wrk through %s: socket errors: connect %s, read %s, write %s, timeout %s", c.name, e[1], e[2], e[3], e[4])
	}
	if n := atoiMatch(wrkNon2xxRe, out); n > 0 {
		b.note("wrk through %s: %d responses not 2xx/3xx", c.name, n)
	}
	rps, _ := strconv.ParseFloat(m[1], 64)
	b.res.wrkRPS.add(c.name, rps)
	b.res.wrkP50.add(c.name, pcts["50"])
	b.res.wrkP99.add(c.name, pcts["99"])
	logf("  wrk    %-18s %8.0f req/s  p50 %.2f ms  p99 %.2f ms", c.name, rps, pcts["50"], pcts["99"])
	return nil
}

func (b *bench) runIperf(ctx context.Context, c contender, args []string) error {
	out, err := commandTimeout(ctx, b.cfg.iperfDur+60*time.Second, b.inClient(args...)...)
	if ctx.Err() != nil {
		return ctx.Err()
	}
	var res struct {
		Error string `json:"error"`
		End   struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	jerr := json.Unmarshal([]byte(out), &res)
	if err != nil || jerr != nil || res.Error != "" || res.End.SumReceived.BitsPerSecond == 0 {
		b.note("iperf3 through %s failed: %v %s %s", c.name, err, res.Error, tail(out))
		return b.restartIperf(ctx)
	}
	gbps := res.End.SumReceived.BitsPerSecond / 1e9
	b.res.iperfGbps.add(c.name, gbps)
	logf("  iperf3 %-18s %8.2f Gbit/s", c.name, gbps)
	return nil
}

func atoiMatch(re *regexp.Regexp, s string) int {
	m := re.FindStringSubmatch(s)
	if m == nil {
		return 0
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

func tail(s string) string {
	s = strings.TrimSpace(s)
	if len(s) > 300 {
		s = "..." + s[len(s)-300:]
	}
	return s
}

// readyScript is a set-up latency container's command: request the path
// through localhost until it succeeds, every interval, then idle.
func readyScript(path, interval string) string {
	return fmt.Sprintf("until timeout 5 wget -q -O /dev/null http://localhost:%d%s; do usleep %s; done; exec sleep 3600",
		cReady, path, interval)
}

// socketReadyScript is readyScript until the socket path served a request:
// the first-hit recorder answers "direct" to a request that did not come
// from the relay.
func socketReadyScript(path, interval string) string {
	return fmt.Sprintf("until timeout 5 wget -q -O - http://localhost:%d%s 2>/dev/null | grep -q direct; do usleep %s; done; exec sleep 3600",
		cReady, path, interval)
}

// setupLatency measures how soon a new labelled container is served: first
// containers started one by one with docker run, through each connectable
// contender (time from docker run returning to the first request reaching
// the backend; the container retries every 2 ms), then, through the relay,
// many started at once through the API.
func (b *bench) setupLatency(ctx context.Context) error {
	b.res.seq = map[string][]time.Duration{}
	for _, c := range b.contenders {
		if c.daemon == "" {
			continue
		}
		if err := b.prepare(ctx, c); err != nil {
			return err
		}
		if err := b.seqLatency(ctx, c); err != nil {
			return err
		}
	}
	for _, c := range b.contenders {
		if c.daemon == relayDaemon {
			if err := b.prepare(ctx, c); err != nil {
				return err
			}
			return b.burstLatency(ctx)
		}
	}
	return nil
}

func (b *bench) seqLatency(ctx context.Context, c contender) error {
	socket := c.daemon == socketDaemon
	labels := map[string]string{fmt.Sprintf("connect.%d", cReady): "ready.bench.test"}
	network, script := "none", readyScript
	if socket {
		network, script = b.mvNet, socketReadyScript
		b.res.commands = append(b.res.commands, fmt.Sprintf(
			"set-up, one by one, %s: docker run -d --network <macvlan network %s, gateway the backend namespace> --label connect.%d=ready.bench.test <busybox> sh -c '%s'; "+
				"latency = first request at the backend − docker run returned; through the socket path = first request not from the relay's address", c.name, mvSubnet, cReady, script("/<id>", "2000")))
	} else {
		b.res.commands = append(b.res.commands, fmt.Sprintf(
			"set-up, one by one, %s: docker run -d --network none --label connect.%d=ready.bench.test <busybox> sh -c '%s'; "+
				"latency = first request at the backend − docker run returned", c.name, cReady, script("/<id>", "2000")))
	}

	logf("set-up latency through %s: %d containers one by one", c.name, b.cfg.seq)
	var ids []string
	for i := 0; i < b.cfg.seq; i++ {
		path := fmt.Sprintf("/seq-%s-%s-%d", b.tag, c.daemon, i)
		argv := []string{"docker", "run", "-d", "--network", network, "--name", fmt.Sprintf("cb-seq-%s-%s-%d", b.tag, c.daemon, i),
			"--label", testLabel + "=1", "--label", runLabel + "=" + b.id}
		for k, v := range labels {
			argv = append(argv, "--label", k+"="+v)
		}
		argv = append(argv, imageName, "sh", "-c", script(path, "2000"))
		out, err := command(ctx, argv...)
		returned := time.Now()
		if err != nil {
			return err
		}
		ids = append(ids, strings.TrimSpace(out))
		served := func() bool { _, ok := b.hits.at(path); return ok }
		if socket {
			served = func() bool { _, ok := b.hits.directAt(path); return ok }
		}
		if err := waitFor(ctx, 30*time.Second, served); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			b.note("set-up through %s: container %d never served within 30 s", c.name, i)
			continue
		}
		at, _ := b.hits.at(path)
		b.res.seq[c.name] = append(b.res.seq[c.name], at.Sub(returned))
		if socket {
			direct, _ := b.hits.directAt(path)
			b.res.seqSocket = append(b.res.seqSocket, direct.Sub(returned))
			logf("  container %2d served %v after docker run returned, through the socket path after %v", i+1,
				at.Sub(returned).Round(100*time.Microsecond), direct.Sub(returned).Round(100*time.Microsecond))
		} else {
			logf("  container %2d served %v after docker run returned", i+1, at.Sub(returned).Round(100*time.Microsecond))
		}
	}
	return b.docker.removeAll(ctx, ids)
}

// burstLatency starts many containers at once through the API and measures
// when each is first served.
func (b *bench) burstLatency(ctx context.Context) error {
	labels := map[string]string{fmt.Sprintf("connect.%d", cReady): "ready.bench.test"}
	n := b.cfg.burst
	b.res.commands = append(b.res.commands, fmt.Sprintf(
		"set-up, at once: %d such containers created (untimed), then all started by concurrent API calls (POST /containers/<id>/start), "+
			"each retrying every 20 ms; total = last first request − first start call", n))
	logf("set-up latency: creating %d containers, then starting them at once", n)
	paths := make([]string, n)
	ids := make([]string, n)
	var (
		wg      sync.WaitGroup
		errMu   sync.Mutex
		firstEr error
		sem     = make(chan struct{}, 4)
	)
	for i := range n {
		paths[i] = fmt.Sprintf("/burst-%s-%d", b.tag, i)
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			id, err := b.docker.create(ctx, fmt.Sprintf("cb-burst-%s-%d", b.tag, i), b.id, labels, readyScript(paths[i], "20000"))
			errMu.Lock()
			defer errMu.Unlock()
			ids[i] = id
			if err != nil && firstEr == nil {
				firstEr = err
			}
		}()
	}
	wg.Wait()
	if firstEr != nil {
		return fmt.Errorf("creating containers: %w", firstEr)
	}
	started := make([]time.Time, n)
	t0 := time.Now()
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := b.docker.start(ctx, ids[i])
			started[i] = time.Now()
			if err != nil {
				errMu.Lock()
				if firstEr == nil {
					firstEr = err
				}
				errMu.Unlock()
			}
		}()
	}
	wg.Wait()
	if firstEr != nil {
		return fmt.Errorf("starting containers: %w", firstEr)
	}
	br := &burstResult{n: n}
	for _, s := range started {
		br.allStarted = max(br.allStarted, s.Sub(t0))
	}
	served := func() int {
		k := 0
		for _, p := range paths {
			if _, ok := b.hits.at(p); ok {
				k++
			}
		}
		return k
	}
	if err := waitFor(ctx, 90*time.Second, func() bool { return served() == n }); err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		b.note("set-up at once: only %d of %d containers served within 90 s", served(), n)
	}
	for i, p := range paths {
		if at, ok := b.hits.at(p); ok {
			br.served++
			br.allServed = max(br.allServed, at.Sub(t0))
			br.lag = append(br.lag, at.Sub(started[i]))
		}
	}
	sort.Slice(br.lag, func(i, j int) bool { return br.lag[i] < br.lag[j] })
	b.res.burst = br
	logf("  %d of %d served %v after the first start call (the engine had started all after %v)",
		br.served, n, br.allServed.Round(time.Millisecond), br.allStarted.Round(time.Millisecond))
	logf("removing %d containers", n)
	return b.docker.removeAll(ctx, ids)
}
