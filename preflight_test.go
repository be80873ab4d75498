package main

import (
	"os"
	"slices"
	"testing"
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

// The machine running the tests is the host: preflight passes as root.
func TestPreflightHere(t *testing.T) {
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	missing, err := missingCaps(string(status))
	if err != nil {
		t.Fatal(err)
	}
	if err := preflight(); (err == nil) != (len(missing) == 0 && hostPIDs(1<<30, 1<<30, readComm)) {
		t.Errorf("preflight() = %v with missing capabilities %v", err, missing)
	}
}
