package docker

import (
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	dockerapi "github.com/fsouza/go-dockerclient"

	"github.com/connectable/connectable/internal/testenv"
	"github.com/connectable/connectable/netns"
)

// processIn starts a process inside the namespace at ns and returns its PID;
// it is killed when the test ends.
func processIn(t *testing.T, ns string) int {
	t.Helper()
	cmd := exec.Command("nsenter", "--net="+ns, "sleep", "3600")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	pid := cmd.Process.Pid
	waitFor(t, "the process in its namespace", func() bool {
		return pathInode(netnsPath(pid)) == pathInode(ns)
	}, nil)
	return pid
}

// realNamespaceWatcher is a watcher on the fake engine that opens namespaces
// for real: its containers' PIDs are real processes'.
func realNamespaceWatcher(t *testing.T, f *fakeEngine, sink *recordingSink) (*Watcher, *testenv.SyncBuffer) {
	w, logs := newFakeWatcher(t, f, sink, 50*time.Millisecond)
	w.openNS = w.openNamespace
	w.nsInode = netnsInode
	return w, logs
}

// A PID the engine reports whose process is not in the container's sandbox
// (its PID was reused by the time it was opened): never set up, warned
// about; the same with a sandbox that matches is set up, through a handle
// that enters the process's namespace.
func TestOpenNamespaceChecksSandboxKey(t *testing.T) {
	testenv.NeedRoot(t)
	testenv.NeedCommand(t, "nsenter", "sleep")
	testenv.CheckGoroutines(t)
	theirs, sandbox := testenv.NewNetNS(t), testenv.NewNetNS(t)
	impostor := processIn(t, theirs)

	f := newFakeEngine()
	sink := newRecordingSink()
	sink.keys = nil
	reused := f.add("reused", "", map[string]string{"connect.6000": "a"})
	f.world[reused].State.Pid = impostor
	f.world[reused].NetworkSettings = &dockerapi.NetworkSettings{SandboxKey: sandbox}
	good := f.add("good", "", map[string]string{"connect.6001": "b"})
	f.world[good].State.Pid = impostor
	f.world[good].NetworkSettings = &dockerapi.NetworkSettings{SandboxKey: theirs}
	w, logs := realNamespaceWatcher(t, f, sink)
	startWatcher(t, w)

	got := sink.waitApplied(t, good, map[uint16]string{6001: "b"})
	checkEnters(t, got.netns, theirs)
	waitFor(t, "the warning about the reused PID", func() bool {
		return len(logs.Lines("WARN", "container=reused", "could not be opened as the container's")) == 1
	}, sink)
	if calls := sink.callsFor(reused); len(calls) != 0 {
		t.Errorf("a container whose PID is not in its sandbox was set up: %v", calls)
	}
}

// Without a usable SandboxKey (Podman, a container:<id> member), a second
// inspection must still report the PID: one that changed in between is
// refused.
func TestOpenNamespaceWithoutSandboxKey(t *testing.T) {
	testenv.NeedRoot(t)
	testenv.NeedCommand(t, "nsenter", "sleep")
	testenv.CheckGoroutines(t)
	theirs := testenv.NewNetNS(t)
	p1, p2 := processIn(t, theirs), processIn(t, theirs)

	f := newFakeEngine()
	sink := newRecordingSink()
	sink.keys = nil
	steady := f.add("steady", "", map[string]string{"connect.6000": "a"})
	f.world[steady].State.Pid = p1
	f.world[steady].NetworkSettings = &dockerapi.NetworkSettings{SandboxKey: "/nonexistent/sandbox"}
	moving := f.add("moving", "", map[string]string{"connect.6001": "b"})
	f.world[moving].State.Pid = p1
	// Each inspection of moving sees another PID: the one read first is
	// never the one the verification sees.
	f.onInspect = func(opts dockerapi.InspectContainerOptions) {
		if opts.ID != moving {
			return
		}
		f.mu.Lock()
		defer f.mu.Unlock()
		if c := f.world[moving]; c.State.Pid == p1 {
			c.State.Pid = p2
		} else {
			c.State.Pid = p1
		}
	}
	w, logs := realNamespaceWatcher(t, f, sink)
	startWatcher(t, w)
	got := sink.waitApplied(t, steady, map[uint16]string{6000: "a"})
	checkEnters(t, got.netns, theirs)
	waitFor(t, "the warning about the changed PID", func() bool {
		return len(logs.Lines("WARN", "container=moving", "process changed")) == 1
	}, sink)
	if calls := sink.callsFor(moving); len(calls) != 0 {
		t.Errorf("a container whose PID changed while it was opened was set up: %v", calls)
	}
}

// The handle outlives the process it was opened through: when the
// container's process exits and its PID names another process, the namespace
// the Sink was given is still the container's.
func TestHandleOutlivesPID(t *testing.T) {
	testenv.NeedRoot(t)
	testenv.NeedCommand(t, "nsenter", "sleep")
	theirs := testenv.NewNetNS(t)
	cmd := exec.Command("nsenter", "--net="+theirs, "sleep", "3600")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	waitFor(t, "the process in its namespace", func() bool { return pathInode(netnsPath(pid)) == pathInode(theirs) }, nil)
	w := newWatcher(Config{}, nil)
	h, err := w.openNamespace(t.Context(), &dockerapi.Container{ID: "x", State: dockerapi.State{Running: true, Pid: pid},
		NetworkSettings: &dockerapi.NetworkSettings{SandboxKey: theirs}})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Release()
	_ = cmd.Process.Signal(syscall.SIGKILL)
	_ = cmd.Wait()
	checkEnters(t, h.Name(), theirs)
}

// checkEnters checks that the namespace name (a handle's) enters is ns.
func checkEnters(t *testing.T, name, ns string) {
	t.Helper()
	if !netns.IsHandle(name) {
		t.Errorf("set up by %q, not a handle", name)
		return
	}
	var in uint64
	err := netns.Do(name, func() error { in = pathInode("/proc/thread-self/ns/net"); return nil })
	if want := pathInode(ns); err != nil || in != want {
		t.Errorf("%s enters %d (err %v); want %s, %d", name, in, err, strings.TrimPrefix(ns, "/var/run/netns/"), want)
	}
}
