package e2e

import (
	"context"
	"os"
	"os/exec"
	"slices"
	"syscall"
	"testing"
	"time"

	dockerapi "github.com/fsouza/go-dockerclient"

	"github.com/connectable/connectable/internal/testenv"
)

// BenchmarkHookStart measures what the hook costs a container's start:
// from the create call to the start call's return (the engine returns once
// runc has started the container's process), on a private engine with a
// running daemon (relay), for runc and connectable's runtime, with and
// without connect.* labels. Each iteration starts one container of each
// kind; it reports each kind's median and 99th percentile. Run it with
// e.g. -benchtime=100x:
//
//	go test ./e2e/ -run '^$' -bench BenchmarkHookStart -benchtime=100x
func BenchmarkHookStart(b *testing.B) {
	testenv.NeedRoot(b)
	testenv.NeedDocker(b)
	testenv.LockDaemons(b)
	dir := benchHookDir(b)
	e := testenv.StartEngine(b, testenv.EngineConfig{
		Bip:         "198.18.211.1/24",
		Runtimes:    map[string]string{"connectable": binary},
		RuntimeArgs: map[string][]string{"connectable": {"runtime", "--hook-socket=" + dir.sock, "--hook-log=" + dir.log, "--"}},
	})
	img := e.ImportBusybox(b)
	d := benchDaemon(b, e, dir)
	defer d()
	client, err := dockerapi.NewClient(e.Host())
	if err != nil {
		b.Fatal(err)
	}
	type variant struct {
		name, runtime string
		labels        map[string]string
	}
	var variants []variant
	for _, rt := range []string{"runc", "connectable"} {
		variants = append(variants,
			variant{rt + "-unlabelled", rt, map[string]string{"connectable.test": "1"}},
			variant{rt + "-labelled", rt, map[string]string{"connectable.test": "1", "connect.6000": "127.0.0.1:9"}})
	}
	startOne := func(v variant) time.Duration {
		t0 := time.Now()
		c, err := client.CreateContainer(dockerapi.CreateContainerOptions{
			Config:     &dockerapi.Config{Image: img, Cmd: []string{"sleep", "3600"}, Labels: v.labels},
			HostConfig: &dockerapi.HostConfig{Runtime: v.runtime},
		})
		if err != nil {
			b.Fatal(err)
		}
		if err := client.StartContainer(c.ID, nil); err != nil {
			b.Fatal(err)
		}
		took := time.Since(t0)
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := client.RemoveContainer(dockerapi.RemoveContainerOptions{ID: c.ID, Force: true, Context: ctx}); err != nil {
			b.Fatal(err)
		}
		return took
	}
	for _, v := range variants {
		startOne(v) // warm-up: the first start of each kind pays for caches
	}
	// Each iteration starts one container of every kind, in an order that
	// rotates, so that the machine's load drifts over all kinds alike.
	took := make([][]time.Duration, len(variants))
	i := 0
	for b.Loop() {
		for k := range variants {
			j := (i + k) % len(variants)
			took[j] = append(took[j], startOne(variants[j]))
		}
		i++
	}
	for j, v := range variants {
		d := took[j]
		slices.Sort(d)
		b.ReportMetric(float64(d[len(d)/2].Microseconds())/1000, v.name+"-median-ms")
		b.ReportMetric(float64(d[min(len(d)-1, len(d)*99/100)].Microseconds())/1000, v.name+"-p99-ms")
	}
}

func benchHookDir(b *testing.B) hookDir {
	b.Helper()
	dir, err := os.MkdirTemp("", "cnt-hook-")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(dir) })
	return hookDir{dir: dir, sock: dir + "/hook.sock", log: dir + "/hook.log"}
}

// benchDaemon starts a relay daemon against e serving hooks, and returns
// what stops it.
func benchDaemon(b *testing.B, e *testenv.Engine, h hookDir) func() {
	b.Helper()
	cmd := exec.Command(binary, "--datapath", "relay", "--docker-host", e.Host(), "--hook-socket", h.sock, "--admin", "", "--dns", "127.0.0.1:53", "--log-level", "warn")
	var logs testenv.SyncBuffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(h.sock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			b.Fatalf("the daemon did not open its hook socket:\n%s", logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(time.Second) // its first listing
	return func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
		if b.Failed() {
			b.Logf("daemon logs:\n%s", logs.String())
		}
	}
}
