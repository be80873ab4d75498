package iptables

import (
	"bytes"
	"fmt"
	"os/exec"
	"strings"
)

// Backends for Config.Backend.
const (
	BackendAuto   = "auto"
	BackendNFT    = "nft"
	BackendLegacy = "legacy"
)

// defaultHostNetNS is the namespace whose rules auto detection reads: the
// host's, also when connectable runs in a container with --pid=host.
const defaultHostNetNS = "/proc/1/ns/net"

// pickBackend decides between the two from how many rules each already holds
// in the host's namespace. The kernel runs both, but Docker's own rules live
// in one of them, and so must ours, or a human debugging with the other
// binary sees half the picture. nf_tables wins a tie: it is what current
// distributions and Docker default to.
func pickBackend(nftRules, legacyRules int) string {
	if legacyRules > 0 && nftRules == 0 {
		return BackendLegacy
	}
	return BackendNFT
}

// countRules counts the rules in iptables-save output.
func countRules(save []byte) int {
	n := 0
	for line := range bytes.Lines(save) {
		if bytes.HasPrefix(line, []byte("-A ")) {
			n++
		}
	}
	return n
}

// binaries names the programs of one backend.
type binaries struct {
	ip4, ip6, restore4, restore6, save4, save6 string
}

func binariesOf(backend string) binaries {
	return binaries{
		ip4:      "iptables-" + backend,
		ip6:      "ip6tables-" + backend,
		restore4: "iptables-" + backend + "-restore",
		restore6: "ip6tables-" + backend + "-restore",
		save4:    "iptables-" + backend + "-save",
		save6:    "ip6tables-" + backend + "-save",
	}
}

// lookPath finds a program on PATH or, since daemons often run with a
// minimal PATH, in the sbin directories where Debian puts iptables.
func lookPath(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, dir := range []string{"/usr/sbin", "/sbin", "/usr/local/sbin"} {
		if p, err := exec.LookPath(dir + "/" + name); err == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found on PATH or in /usr/sbin, /sbin, /usr/local/sbin", name)
}

// detect counts the rules each backend holds in the namespace at hostNS and
// picks one. It only runs the *-save programs, which read and never load a
// table.
func (n *NAT) detect(hostNS string) (backend, reason string) {
	counts := map[string]int{}
	for _, b := range []string{BackendNFT, BackendLegacy} {
		bins := binariesOf(b)
		for _, name := range []string{bins.save4, bins.save6} {
			path, err := lookPath(name)
			if err != nil {
				n.log.Debug("backend detection skips a program", "program", name, "err", err)
				continue
			}
			var out []byte
			err = n.do(hostNS, func() (err error) {
				out, err = exec.Command(path).Output()
				return err
			})
			if err != nil {
				n.log.Debug("backend detection skips a program", "program", name, "err", err)
				continue
			}
			counts[b] += countRules(out)
		}
	}
	backend = pickBackend(counts[BackendNFT], counts[BackendLegacy])
	where := hostNS
	if where == "" {
		where = "own network namespace"
	}
	reason = fmt.Sprintf("auto: %s holds %d nf_tables and %d legacy rules", where, counts[BackendNFT], counts[BackendLegacy])
	return backend, reason
}

// normalizeBackend maps a flag value to a backend name, or "" for auto.
func normalizeBackend(s string) (string, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "", BackendAuto:
		return "", nil
	case BackendNFT, "nf_tables":
		return BackendNFT, nil
	case BackendLegacy:
		return BackendLegacy, nil
	default:
		return "", fmt.Errorf("unknown iptables backend %q (want auto, nft or legacy)", s)
	}
}
