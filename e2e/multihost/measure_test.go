package multihost

import (
	"cmp"
	"fmt"
	"io"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

// figures are what one fault cost the application, over the requests
// started from the fault until the end of its window.
type figures struct {
	requests  int
	failed    int           // requests that failed
	lateFail  int           // of them, started a second or more after the fault
	slow      int           // requests that took longer than 1 s, failed or not
	stall     time.Duration // the longest request
	lateStall time.Duration // the longest started a second or more after the fault
	// settled is when, after the fault, the last request that failed, took
	// over a second or reached a lost instance ended; from then on traffic
	// went to survivors only.
	settled time.Duration
	// spread: every survivor answered in the window's last seconds.
	spread bool
	// longEnd is how long the long-lived connections to lost instances took
	// to end after the fault (the slowest); -1 if one had not ended when
	// the window closed; 0 if none was open there.
	longEnd time.Duration
	longs   int // long-lived connections open to lost instances at the fault
	// slowest describes the three slowest requests, for diagnosis.
	slowest string
}

// measure computes figures for a fault at t0 whose window ends at t1.
// lost says whether an instance's name (name@H) is lost by the fault;
// survivors lists those that must all answer in the window's last seconds.
func (l *load) measure(t0, t1 time.Time, lost func(string) bool, survivors []string) figures {
	var f figures
	rs := l.between(t0, t1)
	f.requests = len(rs)
	var settledAt time.Time
	for _, r := range rs {
		end := r.start.Add(r.dur)
		bad := false
		if !r.ok {
			f.failed++
			bad = true
			if r.start.Sub(t0) >= time.Second {
				f.lateFail++
			}
		}
		if r.dur > time.Second {
			f.slow++
			bad = true
		}
		if r.ok && lost(r.who) {
			bad = true
		}
		f.stall = max(f.stall, r.dur)
		if r.start.Sub(t0) >= time.Second {
			f.lateStall = max(f.lateStall, r.dur)
		}
		if bad && end.After(settledAt) {
			settledAt = end
		}
	}
	slow := slices.Clone(rs)
	slices.SortFunc(slow, func(x, y request) int { return cmp.Compare(y.dur, x.dur) })
	for i, r := range slow[:min(3, len(slow))] {
		if i > 0 {
			f.slowest += ", "
		}
		f.slowest += fmt.Sprintf("+%v %v %s", r.start.Sub(t0).Round(time.Millisecond), r.dur.Round(time.Millisecond), r.who)
	}
	if !settledAt.IsZero() {
		f.settled = settledAt.Sub(t0)
	}
	tailFrom := t1.Add(-3 * time.Second)
	seen := answeredBy(l.between(tailFrom, t1))
	f.spread = len(survivors) > 0
	for _, s := range survivors {
		if seen[s] == 0 {
			f.spread = false
		}
	}

	// Long-lived connections: the latest open of each id before t0, and
	// the first end after it.
	l.mu.Lock()
	defer l.mu.Unlock()
	open := map[int]longEvent{}
	for _, e := range l.longs {
		if e.at.After(t0) {
			break
		}
		if e.open {
			open[e.id] = e
		} else {
			delete(open, e.id)
		}
	}
	for id, o := range open {
		if !lost(o.who) {
			continue
		}
		f.longs++
		ended := time.Time{}
		for _, e := range l.longs {
			if !e.open && e.id == id && e.at.After(t0) {
				ended = e.at
				break
			}
		}
		switch {
		case ended.IsZero() || ended.After(t1):
			f.longEnd = -1
		case f.longEnd >= 0:
			f.longEnd = max(f.longEnd, ended.Sub(t0))
		}
	}
	return f
}

// waitLongEnded waits, up to limit after the fault at t0, for the
// long-lived connections to lost instances to end, and returns f with
// their figures over that longer window: the requests' window is the
// fault's, but a connection's bound (--backend-timeout) may be longer.
func (l *load) waitLongEnded(f figures, t0 time.Time, lost func(string) bool, limit time.Duration) figures {
	for {
		g := l.measure(t0, time.Now(), lost, nil)
		if g.longEnd >= 0 || time.Since(t0) > limit {
			f.longs, f.longEnd = g.longs, g.longEnd
			return f
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func (f figures) String() string {
	return fmt.Sprintf("requests %d, failed %d (%d after 1s), slower than 1s %d, longest stall %v (after 1s: %v), settled after %v, spread %v, long-lived to lost %d ended after %s",
		f.requests, f.failed, f.lateFail, f.slow, f.stall.Round(time.Millisecond), f.lateStall.Round(time.Millisecond),
		f.settled.Round(time.Millisecond), f.spread, f.longs, f.longEndString())
}

func (f figures) longEndString() string {
	switch {
	case f.longs == 0:
		return "-"
	case f.longEnd < 0:
		return "not ended"
	}
	return f.longEnd.Round(100 * time.Millisecond).String()
}

// row is one line of the fault table.
type row struct {
	fault, datapath string
	f               figures
	detect          time.Duration // Consul's detection, where the fault has one; 0 otherwise
	note            string
}

func printTable(w io.Writer, rows []row) {
	fmt.Fprintln(w, "| fault | data path | requests | failed (after 1 s) | > 1 s | longest stall (after 1 s) | settled | long-lived to lost ended | Consul detection | note |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|---|---|---|---|")
	for _, r := range rows {
		det := "-"
		if r.detect > 0 {
			det = r.detect.Round(100 * time.Millisecond).String()
		}
		fmt.Fprintf(w, "| %s | %s | %d | %d (%d) | %d | %v (%v) | %v | %s | %s | %s |\n",
			r.fault, r.datapath, r.f.requests, r.f.failed, r.f.lateFail, r.f.slow,
			r.f.stall.Round(10*time.Millisecond), r.f.lateStall.Round(10*time.Millisecond),
			r.f.settled.Round(100*time.Millisecond), longCell(r.f), det, r.note)
	}
}

func longCell(f figures) string {
	if f.longs == 0 {
		return "-"
	}
	return fmt.Sprintf("%d: %s", f.longs, f.longEndString())
}

var metricLine = regexp.MustCompile(`^([a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$`)

// metric sums the samples of a metric of host h's daemon whose labels
// contain every part of match.
func (h *host) metric(name string, match ...string) (float64, error) {
	resp, err := h.http.Get("http://127.0.0.1:9876/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	sum := 0.0
	for _, line := range strings.Split(string(body), "\n") {
		m := metricLine.FindStringSubmatch(line)
		if m == nil || m[1] != name {
			continue
		}
		ok := true
		for _, s := range match {
			if !strings.Contains(m[2], s) {
				ok = false
			}
		}
		if ok {
			v, _ := strconv.ParseFloat(m[3], 64)
			sum += v
		}
	}
	return sum, nil
}
