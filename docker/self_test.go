package docker

import (
	"bytes"
	"os"
	"strings"
	"testing"

	"github.com/connectable/connectable/internal/testenv"
)

func TestSelfContainerID(t *testing.T) {
	const id = "331f5ca2c8ebef1008af203085936e8f4a646f1c6cbf5804452f2afdb0cb9b34"
	const owner = "1c64581a2c9a170ff39e623b03d6bcce0327022849177c69621daa36ec3b4ac9"
	tests := []struct {
		name      string
		cgroup    string
		mountinfo string
		want      string
	}{
		{name: "host, cgroup v1", cgroup: "4:memory:/user.slice\n1:cpu:/\n0::/\n", want: ""},
		{name: "host, cgroup v2", cgroup: "0::/init.scope\n", want: ""},
		{name: "host with other ids", cgroup: "4:memory:/process_api/477faa774af935550bdd18bfbb0fbed9\n", mountinfo: "" +
			"501 42 254:0 /var/lib/docker/containers/" + owner + "/mounts/shm /var/lib/docker/containers/" + owner + "/mounts/shm rw - tmpfs shm rw\n", want: ""},
		{name: "cgroupfs driver", cgroup: "9:name=systemd:/docker/" + id + "\n4:memory:/docker/" + id + "\n0::/docker/" + id + "\n", want: id},
		{name: "systemd driver", cgroup: "0::/system.slice/docker-" + id + ".scope\n", want: id},
		{name: "cgroup v2 namespace, mountinfo", cgroup: "0::/\n", mountinfo: "" +
			"126 109 254:0 /var/lib/docker/containers/" + id + "/resolv.conf /etc/resolv.conf rw,relatime - ext4 /dev/vda rw\n" +
			"127 109 254:0 /var/lib/docker/containers/" + id + "/hostname /etc/hostname rw,relatime - ext4 /dev/vda rw\n", want: id},
		{name: "cgroup wins over a shared namespace's files", cgroup: "0::/docker/" + id + "\n", mountinfo: "" +
			"127 109 254:0 /var/lib/docker/containers/" + owner + "/hostname /etc/hostname rw - ext4 /dev/vda rw\n", want: id},
		{name: "short hex is not an id", cgroup: "0::/docker/331f5ca2c8eb\n", want: ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := selfContainerID([]byte(tt.cgroup), []byte(tt.mountinfo)); got != tt.want {
				t.Errorf("selfContainerID = %q; want %q", got, tt.want)
			}
		})
	}
}

// TestSelfContainerIDInContainer reads the files as a process inside real
// containers sees them, including one that shares another's namespace.
func TestSelfContainerIDInContainer(t *testing.T) {
	img := testenv.BusyboxImage(t)
	owner := testenv.RunContainer(t, img, "sleep", "600")
	member := testenv.RunContainer(t, "--network", "container:"+owner, img, "sleep", "600")
	for _, id := range []string{owner, member} {
		cgroup := testenv.Run(t, "docker", "exec", id, "cat", "/proc/self/cgroup")
		mountinfo := testenv.Run(t, "docker", "exec", id, "cat", "/proc/self/mountinfo")
		if got := selfContainerID([]byte(cgroup), []byte(mountinfo)); got != id {
			t.Errorf("in %s: selfContainerID = %q; want %q", short(id), got, id)
		}
		// Without cgroup paths (cgroup v2 with its own namespace) the
		// owner's files still give the owner away.
		if got := selfContainerID([]byte("0::/\n"), []byte(mountinfo)); got != owner {
			t.Errorf("in %s, mountinfo only: selfContainerID = %q; want %q", short(id), got, owner)
		}
	}
	// And this process, on the host while those containers run (where the
	// engine shares its mount namespace, their /dev/shm mounts show in ours
	// too, and must not be taken for ours). The engine says which
	// containers run; unless this test runs in one of them (its ID in our
	// cgroup path), the answer is "".
	cgroup, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	mountinfo, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("our mountinfo shows the containers' mounts: %v", bytes.Contains(mountinfo, []byte("/containers/"+owner+"/")))
	want := ""
	for _, id := range strings.Fields(testenv.Run(t, "docker", "ps", "-q", "--no-trunc")) {
		if bytes.Contains(cgroup, []byte(id)) {
			want = id
		}
	}
	if got := selfContainerID(cgroup, mountinfo); got != want {
		t.Errorf("SelfContainerID() here = %q; want %q (the running container whose ID is in our cgroup path, if any)", got, want)
	}
}
