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
// without connect.* labels. It reports the median and the 99th percentile
// of the iterations; run it with e.g. -benchtime=100x:
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
	for _, rt := range []string{"runc", "connectable"} {
		for _, labelled := range []bool{false, true} {
			name := rt + "/unlabelled"
			if labelled {
				name = rt + "/labelled"
			}
			b.Run(name, func(b *testing.B) {
				labels := map[string]string{"connectable.test": "1"}
				if labelled {
					labels["connect.6000"] = "127.0.0.1:9"
				}
				var took []time.Duration
				for b.Loop() {
					t0 := time.Now()
					c, err := client.CreateContainer(dockerapi.CreateContainerOptions{
						Config:     &dockerapi.Config{Image: img, Cmd: []string{"sleep", "3600"}, Labels: labels},
						HostConfig: &dockerapi.HostConfig{Runtime: rt},
					})
					if err != nil {
						b.Fatal(err)
					}
					if err := client.StartContainer(c.ID, nil); err != nil {
						b.Fatal(err)
					}
					took = append(took, time.Since(t0))
					b.StopTimer()
					ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
					err = client.RemoveContainer(dockerapi.RemoveContainerOptions{ID: c.ID, Force: true, Context: ctx})
					cancel()
					if err != nil {
						b.Fatal(err)
					}
					b.StartTimer()
				}
				slices.Sort(took)
				b.ReportMetric(float64(took[len(took)/2].Microseconds())/1000, "median-ms")
				b.ReportMetric(float64(took[min(len(took)-1, len(took)*99/100)].Microseconds())/1000, "p99-ms")
			})
		}
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
	cmd := exec.Command(binary, "--docker-host", e.Host(), "--hook-socket", h.sock, "--admin", "", "--dns", "127.0.0.1:53", "--log-level", "warn")
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
