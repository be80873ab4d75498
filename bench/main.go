// Command bench measures connectable against the proxies people would
// otherwise put in front of a service, side by side in one run on one
// machine, and writes a Markdown report (issue 7).
//
// It builds a small world of its own: a backend namespace holding nginx
// (1 KiB responses), iperf3 and two small in-process servers, a labelled
// busybox container started with --network none as the client, and the
// daemon's namespace. Two veth pairs join the backend namespace to the other
// two, so every contender reaches the backend over one veth hop:
//
//	client container ─────── veth ───┐
//	  ab, wrk, iperf3 (nsenter)       │
//	  HAProxy, nginx stream           ├─ backend namespace: nginx :80,
//	  connectable's listener          │  iperf3 :5201, holder :9000,
//	daemon's namespace ────── veth ───┘  first-hit recorder :8081
//	  connectable (dials from here)
//
// The daemon's namespace is, per placement (issue 19), a bench-host
// namespace of the run's own that also runs dnsmasq (clean), or the
// machine's own (host, as users run the daemon; dnsmasq then answers from
// the backend namespace). In the machine's own namespace the run adds one
// veth and nothing else, and checks that it left it as it found it.
//
// The contenders are measured in rounds, interleaved and rotated (A B C D,
// then B C D A, ...), and reported as medians with min–max and ratios to
// the direct path.
//
// Typical usage (as root, from the repository root):
//
//	make bench                 # the full run, under 10 minutes
//	make bench ARGS=--quick    # under 2 minutes
//	make bench ARGS=--install  # apt-get install the tools first
//	go run ./bench --workloads ab,mem --connectable /tmp/connectable-pprof
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"sort"
	"strings"
	"syscall"
	"time"
)

// config is what the flags chose.
type config struct {
	quick       bool
	install     bool
	connectable string
	gomaxprocs  int // for connectable only; 0 leaves the variable unset
	outDir      string
	rounds      int
	abDur       time.Duration
	wrkDur      time.Duration
	iperfDur    time.Duration
	conns       int // idle connections held through each proxy
	seq         int // containers started one by one
	burst       int // containers started at once
	workloads   map[string]bool
	contenders  map[string]bool
	lockWait    time.Duration
	pause       bool
	placements  []string // where the daemon runs, in run order: placementClean, placementHost
}

var allWorkloads = []string{"ab", "wrk", "iperf", "mem", "setup"}

// socketContender is connectable with --datapath socket.
const socketContender = "connectable socket"

func parseFlags(args []string) (*config, error) {
	c := &config{}
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.BoolVar(&c.quick, "quick", false, "short run (under 2 minutes): fewer rounds, shorter runs, fewer containers")
	fs.BoolVar(&c.install, "install", false, "apt-get install the tools the benchmark needs first (Debian)")
	fs.StringVar(&c.connectable, "connectable", "bin/connectable", "the connectable binary to measure")
	fs.IntVar(&c.gomaxprocs, "gomaxprocs", 0, "run connectable with this GOMAXPROCS (0: leave the variable unset)")
	fs.StringVar(&c.outDir, "out", "bench/results", "directory for the Markdown results file")
	rounds := fs.Int("rounds", 0, "rounds of the throughput workloads (0: 5, or 2 with --quick)")
	conns := fs.Int("conns", 0, "idle connections held through each proxy (0: 2000)")
	workloads := fs.String("workloads", strings.Join(allWorkloads, ","), "workloads to run: "+strings.Join(allWorkloads, ","))
	contenders := fs.String("contenders", "direct,HAProxy,nginx,connectable,"+socketContender, "contenders to measure (direct is always measured: ratios need it)")
	fs.BoolVar(&c.pause, "pause", false, "set up (the first placement), print how to reach each contender, then wait for Ctrl-C instead of measuring (for profiling by hand)")
	placement := fs.String("placement", "both", "where the connectable daemon runs: clean (a network namespace of the run's own), "+
		"host (the machine's own network namespace, as users run it) or both (one after the other, each with its own set-up)")
	fs.DurationVar(&c.lockWait, "lock-wait", 15*time.Minute, "how long to wait for another run's connectable daemon to finish")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: bench [options]   (as root, from the repository root)\n\n"+
			"Measures direct, HAProxy (TCP mode), nginx (stream) and connectable (relay and socket\n"+
			"data paths) with ab (a new\n"+
			"connection per request), wrk (keep-alive), iperf3 (bulk), idle connections' memory and\n"+
			"set-up latency, with the daemon in a namespace of its own, in the machine's own, or both;\n"+
			"prints a Markdown report and writes it under -out.\n\nOptions:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments: %v", fs.Args())
	}
	if c.gomaxprocs < 0 {
		return nil, fmt.Errorf("-gomaxprocs %d: want 0 (unset) or more", c.gomaxprocs)
	}
	if c.quick {
		c.rounds, c.abDur, c.wrkDur, c.iperfDur = 2, 2*time.Second, 2*time.Second, 2*time.Second
		c.conns, c.seq, c.burst = 2000, 5, 20
	} else {
		c.rounds, c.abDur, c.wrkDur, c.iperfDur = 5, 4*time.Second, 4*time.Second, 3*time.Second
		c.conns, c.seq, c.burst = 2000, 20, 100
	}
	if *rounds > 0 {
		c.rounds = *rounds
	}
	if *conns > 0 {
		c.conns = *conns
	}
	c.workloads = map[string]bool{}
	for _, w := range strings.Split(*workloads, ",") {
		w = strings.TrimSpace(w)
		if w == "" {
			continue
		}
		known := false
		for _, k := range allWorkloads {
			known = known || k == w
		}
		if !known {
			return nil, fmt.Errorf("unknown workload %q (known: %s)", w, strings.Join(allWorkloads, ","))
		}
		c.workloads[w] = true
	}
	switch *placement {
	case "both":
		c.placements = []string{placementClean, placementHost}
	case placementClean, placementHost:
		c.placements = []string{*placement}
	default:
		return nil, fmt.Errorf("-placement %q: want clean, host or both", *placement)
	}
	c.contenders = map[string]bool{"direct": true}
	for _, n := range strings.Split(*contenders, ",") {
		n = strings.TrimSpace(n)
		switch n {
		case "":
		case "direct", "HAProxy", "nginx", "connectable", socketContender:
			c.contenders[n] = true
		default:
			return nil, fmt.Errorf("unknown contender %q (known: direct, HAProxy, nginx, connectable, %s)", n, socketContender)
		}
	}
	return c, nil
}

func main() {
	os.Exit(run())
}

func run() int {
	cfg, err := parseFlags(os.Args[1:])
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 2
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "bench: needs root (namespaces, nsenter, Docker)")
		return 2
	}
	if cfg.install {
		if err := install(); err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			return 1
		}
	}
	if missing := missingTools(); len(missing) > 0 {
		fmt.Fprintf(os.Stderr, "bench: missing: %s\n  install with: make bench ARGS=--install  (or: apt-get install %s)\n",
			strings.Join(missing, ", "), strings.Join(packagesFor(missing), " "))
		return 2
	}

	// The first Ctrl-C cancels the run; signals that follow are swallowed
	// until the clean-up has finished, so it is never cut short.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	b, err := newBench(cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 1
	}
	err = b.run(ctx)
	b.runCleanups()
	b.unlock()
	if err != nil {
		logf("FAILED: %v (logs kept in %s)", err, b.dir)
		return 1
	}
	_ = os.RemoveAll(b.dir)
	return 0
}

// run is the whole benchmark: for each placement of the daemon, a world of
// its own, measured, then torn down before the next one is built. Within a
// placement the order keeps each workload from disturbing the next: memory
// first (fresh processes), then throughput, then set-up latency (which
// starts and removes many containers).
func (b *bench) run(ctx context.Context) error {
	b.started = time.Now()
	b.loadBefore = loadAvg()
	logf("run %s: %d CPUs, load %s, work directory %s", b.id, runtime.NumCPU(), b.loadBefore, b.dir)
	if err := b.collectVersions(ctx); err != nil {
		return err
	}
	if err := b.lockDaemons(ctx); err != nil {
		return err
	}
	for _, p := range b.cfg.placements {
		if err := b.runPlacement(ctx, p); err != nil {
			return fmt.Errorf("daemon placement %s: %w", p, err)
		}
		if b.cfg.pause {
			return nil
		}
	}
	b.loadAfter = loadAvg()
	b.elapsed = time.Since(b.started)
	report := b.report()
	fmt.Print(report)
	path, err := b.writeReport(report)
	if err != nil {
		return err
	}
	logf("done in %v; results in %s", b.elapsed.Round(time.Second), path)
	return nil
}

// runPlacement builds the world with the daemon placed so, runs the
// workloads, tears the world down and keeps the results.
func (b *bench) runPlacement(ctx context.Context, placement string) error {
	b.startPlacement(placement)
	pr := &placementRun{placement: placement, loadBefore: loadAvg()}
	started := time.Now()
	logf("placement %s: the daemon runs %s; load %s", placement, placementWhere(placement), pr.loadBefore)
	before, err := machineState(ctx)
	if err != nil {
		return err
	}
	if err := b.setup(ctx); err != nil {
		return err
	}
	if err := b.checkMachine(ctx, "after the set-up", before); err != nil {
		return err
	}
	if b.cfg.pause {
		b.printPause()
		<-ctx.Done()
		return nil
	}
	if b.cfg.workloads["mem"] {
		if err := b.memory(ctx); err != nil {
			return err
		}
	}
	if b.cfg.workloads["ab"] || b.cfg.workloads["wrk"] || b.cfg.workloads["iperf"] {
		if err := b.throughput(ctx); err != nil {
			return err
		}
	}
	if b.cfg.workloads["setup"] {
		if err := b.setupLatency(ctx); err != nil {
			return err
		}
	}
	if err := b.checkMachine(ctx, "after the workloads", before); err != nil {
		return err
	}
	pr.contenders = b.contenders
	b.runCleanups()
	if err := b.checkMachine(ctx, "after the clean-up", before); err != nil {
		return err
	}
	pr.res, pr.loadAfter, pr.elapsed = b.res, loadAvg(), time.Since(started)
	b.runs = append(b.runs, pr)
	logf("placement %s done in %v; load %s", placement, pr.elapsed.Round(time.Second), pr.loadAfter)
	return nil
}

// checkMachine compares the machine's own namespace with what it was before
// the set-up: while the world stands it may differ only by the run's one veth
// and what its address brings; after the clean-up, not at all. A difference
// is a note, not a failure: other engineers' tests change it too (a Docker
// network brings iptables rules), and the note lists the lines to judge.
func (b *bench) checkMachine(ctx context.Context, stage string, before map[string][]string) error {
	now, err := machineState(ctx)
	if err != nil {
		return err
	}
	allowed := b.machineVeth
	if stage == "after the clean-up" {
		allowed = ""
	}
	if diff := stateDiff(before, now, allowed); len(diff) > 0 {
		b.note("the machine's own namespace %s differs from before the set-up (beyond the run's veth %q; other activity on the machine, such as a test's Docker network, does this too): %s",
			stage, b.machineVeth, strings.Join(diff, "; "))
		return nil
	}
	logf("the machine's own namespace %s: routes and iptables rules as before the set-up, but for the run's veth %q", stage, b.machineVeth)
	if stage == "after the clean-up" {
		b.res.notes = append(b.res.notes, "The machine's own namespace after the set-up, after the workloads (but for the run's veth and its address's routes) and after the clean-up: "+
			"routes (ip -4/-6 route show table all, ip rule) and iptables rules (iptables-save, ip6tables-save, iptables-legacy-save, ip6tables-legacy-save; counters left out) as before the set-up, unless a note above says otherwise.")
	}
	return nil
}

// logf prints progress to stderr, so stdout holds only the report.
func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "bench %s  %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func minMax(v []float64) (lo, hi float64) {
	for i, x := range v {
		if i == 0 || x < lo {
			lo = x
		}
		if i == 0 || x > hi {
			hi = x
		}
	}
	return lo, hi
}
