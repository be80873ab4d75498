package testenv

import (
	"strings"
	"testing"
)

// A private engine runs a container with a published port, its nat rules
// confined to its own namespace, and leaves nothing behind.
func TestStartEngine(t *testing.T) {
	NeedDocker(t)
	before, err := RootRules()
	if err != nil {
		t.Fatal(err)
	}
	e := StartEngine(t, EngineConfig{Bip: "198.18.199.1/24"})
	img := e.ImportBusybox(t)
	if _, err := e.Docker("run", "-d", "--label", TestLabel, "-p", "8080", img, "httpd", "-f", "-p", "8080"); err != nil {
		t.Fatal(err)
	}
	out, err := e.Docker("ps", "--format", "{{.Ports}}")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(out), "->8080/tcp") {
		t.Fatalf("the container's port is not published: %q", out)
	}
	inside := Exec(t, e.NetNS, "iptables-save", "-t", "nat")
	if !strings.Contains(inside, "DOCKER") {
		t.Errorf("the engine's nat rules are not in its namespace:\n%s", inside)
	}
	after, err := RootRules()
	if err != nil {
		t.Fatal(err)
	}
	if before != after {
		t.Errorf("the machine's own nat table changed:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	if err := e.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := e.Stop(); err != nil {
		t.Fatalf("a second Stop: %v", err)
	}
}
