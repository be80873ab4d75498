package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/connectable/connectable/internal/testenv"
)

func TestMissingCaps(t *testing.T) {
	for _, tc := range []struct {
		name, capEff string
		want         []string
	}{
		{"root on this host", "000001fffeffffff", nil},
		{"docker default set", "00000000a80425fb", []string{"CAP_NET_ADMIN", "CAP_SYS_ADMIN"}},
		{"only NET_ADMIN added", "00000000a80435fb", []string{"CAP_SYS_ADMIN"}},
		{"both added", "00000000a82435fb", nil},
		{"none", "0000000000000000", []string{"CAP_NET_ADMIN", "CAP_SYS_ADMIN"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := missingCaps("Name:\tconnectable\nCapPrm:\t0\nCapEff:\t" + tc.capEff + "\nCapBnd:\t0\n")
			if err != nil || !slices.Equal(got, tc.want) {
				t.Errorf("missingCaps(%s) = %v, %v; want %v", tc.capEff, got, err, tc.want)
			}
		})
	}
	if _, err := missingCaps("Name:\tx\n"); err == nil {
		t.Errorf("missingCaps without a CapEff line: no error")
	}
	if _, err := missingCaps("CapEff:\tzz\n"); err == nil {
		t.Errorf("missingCaps with a bad CapEff: no error")
	}
}

func TestHostPIDs(t *testing.T) {
	comms := func(m map[int]string) func(int) string { return func(pid int) string { return m[pid] } }
	for _, tc := range []struct {
		name      string
		pid, ppid int
		comm      map[int]string
		want      bool
	}{
		{"initial namespace", 4242, 4000, map[int]string{1: "systemd", 2: "kthreadd"}, true},
		{"container with --pid=host", 4242, 4100, map[int]string{1: "systemd", 2: "kthreadd"}, true},
		{"own namespace, entrypoint", 1, 0, map[int]string{1: "connectable"}, false},
		{"own namespace, --init", 7, 1, map[int]string{1: "docker-init", 7: "connectable"}, false},
		{"nested, unknown", 4242, 1, map[int]string{1: "systemd"}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := hostPIDs(tc.pid, tc.ppid, comms(tc.comm)); got != tc.want {
				t.Errorf("hostPIDs = %v; want %v", got, tc.want)
			}
		})
	}
}

// TestPreflightHere runs the real checks three ways on this machine: as root
// on the host they pass; the same test binary without CAP_NET_ADMIN and
// CAP_SYS_ADMIN, or as PID 1 of a PID namespace of its own, fails with the
// remedy named.
func TestPreflightHere(t *testing.T) {
	if os.Getenv(preflightChild) == "1" {
		if err := preflight(); err != nil {
			fmt.Println(err)
			os.Exit(3)
		}
		os.Exit(0)
	}
	testenv.NeedRoot(t)
	testenv.NeedCommand(t, "setpriv", "unshare")
	if err := preflight(); err != nil {
		t.Fatalf("preflight() as root on the host = %v; want nil", err)
	}
	child := func(wrapper ...string) (string, int) {
		t.Helper()
		args := append(wrapper, os.Args[0], "-test.run=^TestPreflightHere$")
		cmd := exec.Command(args[0], args[1:]...)
		cmd.Env = append(os.Environ(), preflightChild+"=1")
		out, err := cmd.CombinedOutput()
		var exit *exec.ExitError
		if err != nil && !errors.As(err, &exit) {
			t.Fatalf("%v: %v: %s", args, err, out)
		}
		return string(out), cmd.ProcessState.ExitCode()
	}
	for _, tc := range []struct {
		name    string
		wrapper []string
		want    []string
	}{
		{"without the capabilities", []string{"setpriv", "--bounding-set", "-net_admin,-sys_admin", "--inh-caps", "-net_admin,-sys_admin", "--"},
			[]string{"missing capabilities CAP_NET_ADMIN, CAP_SYS_ADMIN", "--cap-add NET_ADMIN"}},
		{"in a PID namespace of its own", []string{"unshare", "--pid", "--fork", "--mount-proc", "--"},
			[]string{"the host's processes are not visible", "--pid=host"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, code := child(tc.wrapper...)
			if code != 3 {
				t.Fatalf("preflight passed (exit %d); want a failure: %s", code, out)
			}
			for _, w := range tc.want {
				if !strings.Contains(out, w) {
					t.Errorf("preflight said %q; want it to contain %q", out, w)
				}
			}
		})
	}
}

const preflightChild = "CONNECTABLE_TEST_PREFLIGHT_CHILD"
