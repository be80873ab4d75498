package docker

import (
	"bufio"
	"bytes"
	"os"
	"regexp"
	"strings"
)

// SelfContainerID returns, on a best-effort basis, the ID of the container
// this process runs in, or "" when it seems to run on the host. It reads
// /proc/self/cgroup (cgroup v1, or v2 without a private cgroup namespace:
// ".../docker/<id>" or ".../docker-<id>.scope") and falls back to
// /proc/self/mountinfo, where Docker bind-mounts /etc/hostname from
// /var/lib/docker/containers/<id>/. In a container started with
// --network container:<other> that fallback finds <other>, whose files the
// container shares; the cgroup path is checked first for that reason.
func SelfContainerID() string {
	cgroup, _ := os.ReadFile("/proc/self/cgroup")
	mountinfo, _ := os.ReadFile("/proc/self/mountinfo")
	return selfContainerID(cgroup, mountinfo)
}

var (
	cgroupID    = regexp.MustCompile(`(?:^|/)(?:docker-)?([0-9a-f]{64})(?:\.scope)?$`)
	mountinfoID = regexp.MustCompile(`/containers/([0-9a-f]{64})/`)
)

func selfContainerID(cgroup, mountinfo []byte) string {
	sc := bufio.NewScanner(bytes.NewReader(cgroup))
	for sc.Scan() {
		// hierarchy-ID:controllers:path
		parts := strings.SplitN(sc.Text(), ":", 3)
		if len(parts) != 3 {
			continue
		}
		if m := cgroupID.FindStringSubmatch(parts[2]); m != nil {
			return m[1]
		}
	}
	sc = bufio.NewScanner(bytes.NewReader(mountinfo))
	sc.Buffer(make([]byte, 0, 64*1024), 1024*1024)
	for sc.Scan() {
		// ID parentID major:minor root mountpoint options ...
		f := strings.Fields(sc.Text())
		if len(f) < 5 {
			continue
		}
		switch f[4] {
		case "/etc/hostname", "/etc/hosts", "/etc/resolv.conf":
			// On the host, the same directories show up as the mount
			// points of every container's /dev/shm: only the bind mounts
			// into a container's own /etc say whose it is.
			if m := mountinfoID.FindStringSubmatch(f[3]); m != nil {
				return m[1]
			}
		}
	}
	return ""
}
