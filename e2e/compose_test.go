package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
)

// The README's Compose example, and the addresses it fixes: the network it
// creates (in the benchmarking range 198.18.0.0/15, used nowhere else in the
// tests), the gateway the backends publish on, and Consul's address.
const (
	composeFile    = "testdata/compose/docker-compose.yml"
	composeSubnet  = "198.18.150.0/24"
	composeGateway = "198.18.150.1"
	composeRange   = "198.18.150.128/25" // dynamic addresses, clear of Consul's
	composeConsul  = "http://198.18.150.2:8500"
	// composeLabel marks what this test's override adds, so that a run
	// killed before its clean-up is cleaned up by the next.
	composeLabel = "connectable.test.compose=1"
)

// Case 12: the seed's workflow, from the README's Compose file. Consul, the
// Registrator-style registrar (internal/cmd/register) and connectable run as
// containers; a backend publishes its port on a random host port, as -P does,
// and is registered with that port; a labelled app reaches it through
// localhost:6000. A second instance started the same way gets traffic too,
// and once one is stopped every new connection goes to the other.
//
// The Compose file's daemon runs --datapath auto whatever
// CONNECTABLE_E2E_DATAPATH says: the file is the README's example. The app
// and web share a network, so the socket path serves, at web's own address.
func TestComposeRegistrator(t *testing.T) {
	prerequisites(t)
	testenv.NeedCommand(t, "docker-compose")
	consulBin := os.Getenv("CONNECTABLE_CONSUL")
	if consulBin == "" {
		consulBin = consulBinary
	}
	if _, err := os.Stat(consulBin); err != nil {
		testenv.Skipf(t, "needs a Consul binary at %s (make consul builds it): %v", consulBin, err)
	}
	file, err := os.ReadFile(composeFile)
	if err != nil {
		t.Fatal(err)
	}
	for _, addr := range []string{composeSubnet, composeGateway, composeRange, strings.TrimPrefix(composeConsul, "http://")} {
		if !strings.Contains(string(file), addr) {
			t.Fatalf("%s no longer uses %s; update this test's constants", composeFile, addr)
		}
	}
	removeComposeLeftovers(t)

	tag := daemonImage(t)
	script, _ := filepath.Abs("testdata/compose/images.sh")
	cmd := exec.Command(script)
	cmd.Env = append(os.Environ(), "CONNECTABLE_CONSUL="+consulBin)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", script, err, out)
	}

	c := &compose{t: t, project: testenv.RandomName("cnttest"), image: tag}
	c.override = c.writeOverride()
	t.Cleanup(c.down)
	c.run("up", "-d", "--no-color")
	app := c.ids("app")[0]
	web := c.ids("web")
	if len(web) != 1 {
		t.Fatalf("web containers %v, want 1", web)
	}

	// The registrar registered the published port on the gateway...
	first := web[0]
	c.waitCatalog(map[string]string{first: publishedPort(t, first)})
	// ...and connectable resolves it and serves it.
	host1 := first[:12] // the backend answers with its host name
	eventually(t, 90*time.Second, "app reaches web through localhost:6000", func() error {
		body, err := fetch(t, app, "http://localhost:6000/")
		if err == nil && body != host1 {
			return fmt.Errorf("answer %q, want %q", body, host1)
		}
		return err
	})

	// The app and web share a network, so the socket path serves the
	// port, at web's own address rather than through the published port
	// (the relay served until the service first resolved, and the socket
	// path looks again within seconds).
	eventually(t, 30*time.Second, "the socket path serves localhost:6000 at web's own address", func() error {
		// IPv4 at least: web has no IPv6 address, so [::1] is the relay's.
		if logs := c.logs("connectable"); !strings.Contains(logs, `path="ipv4 socket`) && !strings.Contains(logs, "path=socket") ||
			!strings.Contains(logs, "published ports reached at their containers") {
			return errors.New("the daemon's logs do not say so yet")
		}
		return nil
	})

	// A second instance, published the same way, joins the rotation.
	c.run("up", "-d", "--no-color", "--no-recreate", "--scale", "web=2")
	web = c.ids("web")
	if len(web) != 2 {
		t.Fatalf("web containers %v, want 2", web)
	}
	second := web[0]
	if second == first {
		second = web[1]
	}
	host2 := second[:12]
	c.waitCatalog(map[string]string{first: publishedPort(t, first), second: publishedPort(t, second)})
	eventually(t, 60*time.Second, "both instances serve", func() error {
		seen := map[string]int{}
		for _, body := range fetchMany(t, app, "http://localhost:6000/", 30) {
			seen[body]++
		}
		if seen[host1] == 0 || seen[host2] == 0 || len(seen) != 2 {
			return fmt.Errorf("answers %v, want both %s and %s and nothing else", seen, host1, host2)
		}
		return nil
	})

	// Stopped, the first leaves Consul, and every new connection goes to
	// the second.
	if _, err := testenv.Docker("stop", "-t", "5", first); err != nil {
		t.Fatal(err)
	}
	c.waitCatalog(map[string]string{second: publishedPort(t, second)})
	eventually(t, 60*time.Second, "all new connections go to the remaining instance", func() error {
		for i, body := range fetchMany(t, app, "http://localhost:6000/", 20) {
			if body != host2 {
				return fmt.Errorf("request %d answered %q, want %q", i, body, host2)
			}
		}
		return nil
	})
}

// catalogClient asks Consul; the agent answers at once or not at all.
var catalogClient = &http.Client{Timeout: 5 * time.Second}

// TestComposeExampleInREADME keeps the README's Compose example the file
// that TestComposeRegistrator runs.
func TestComposeExampleInREADME(t *testing.T) {
	file, err := os.ReadFile(composeFile)
	if err != nil {
		t.Fatal(err)
	}
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(readme), "```yaml\n"+string(file)+"```\n") {
		t.Errorf("README.md's Compose example differs from %s; copy the file into it", composeFile)
	}
}

// compose runs docker-compose on the README's file, in a project of its own,
// with an override that adds the test label to everything it creates.
type compose struct {
	t        *testing.T
	project  string
	image    string // connectable's image, the binary under test
	override string
}

// writeOverride returns an override file labelling every service and the
// network. Compose replaces a network's definition rather than merging it, so
// the override repeats the address plan (checked against the file above).
func (c *compose) writeOverride() string {
	out, err := c.compose("config", "--services")
	if err != nil {
		c.t.Fatal(err)
	}
	var b strings.Builder
	labels := fmt.Sprintf(`{labels: {%s: "1", %s: "1"}}`, strings.Split(testenv.TestLabel, "=")[0], strings.Split(composeLabel, "=")[0])
	b.WriteString("services:\n")
	for _, s := range strings.Fields(out) {
		fmt.Fprintf(&b, "  %s: %s\n", s, labels)
	}
	fmt.Fprintf(&b, "networks:\n  demo:\n    labels: {%s: \"1\", %s: \"1\"}\n", strings.Split(testenv.TestLabel, "=")[0], strings.Split(composeLabel, "=")[0])
	fmt.Fprintf(&b, "    ipam: {config: [{subnet: %s, gateway: %s, ip_range: %s}]}\n", composeSubnet, composeGateway, composeRange)
	path := filepath.Join(c.t.TempDir(), "override.yml")
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		c.t.Fatal(err)
	}
	return path
}

// compose runs one docker-compose command, bounded like every docker
// command of the tests, and returns its standard output.
func (c *compose) compose(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), testenv.DockerTimeout)
	defer cancel()
	full := []string{"-p", c.project, "-f", composeFile}
	if c.override != "" {
		full = append(full, "-f", c.override)
	}
	cmd := exec.CommandContext(ctx, "docker-compose", append(full, args...)...)
	cmd.Env = append(os.Environ(), "CONNECTABLE_IMAGE="+c.image)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	switch {
	case ctx.Err() != nil:
		return stdout.String(), fmt.Errorf("docker-compose %s: no answer within %v: %w", strings.Join(args, " "), testenv.DockerTimeout, testenv.ErrDockerStuck)
	case err != nil:
		return stdout.String(), fmt.Errorf("docker-compose %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

func (c *compose) run(args ...string) {
	c.t.Helper()
	if _, err := c.compose(args...); err != nil {
		c.t.Fatal(err)
	}
}

// ids returns the full IDs of a service's containers, running or not.
func (c *compose) ids(service string) []string {
	c.t.Helper()
	out, err := c.compose("ps", "-q", service)
	if err != nil {
		c.t.Fatal(err)
	}
	return strings.Fields(out)
}

// waitCatalog waits until Consul lists exactly the given web containers,
// each at the gateway and its published port. The service IDs the registrar
// gives name the container, so each is matched to its container's name.
func (c *compose) waitCatalog(want map[string]string) {
	c.t.Helper()
	names := map[string]string{} // container name → published port
	for id, port := range want {
		out, err := testenv.Docker("inspect", "-f", "{{.Name}}", id)
		if err != nil {
			c.t.Fatal(err)
		}
		names[strings.TrimPrefix(strings.TrimSpace(string(out)), "/")] = port
	}
	eventually(c.t, 60*time.Second, fmt.Sprintf("Consul lists web at %v", want), func() error {
		resp, err := catalogClient.Get(composeConsul + "/v1/catalog/service/web")
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		var entries []struct {
			ServiceID      string
			ServiceAddress string
			ServicePort    int
		}
		if err := json.NewDecoder(resp.Body).Decode(&entries); err != nil {
			return fmt.Errorf("decoding the catalog: %w", err)
		}
		var got, exp []string
		for _, e := range entries {
			parts := strings.Split(e.ServiceID, ":") // host:container:port
			if len(parts) != 3 {
				return fmt.Errorf("service ID %q is not host:container:port", e.ServiceID)
			}
			got = append(got, fmt.Sprintf("%s %s:%d", parts[1], e.ServiceAddress, e.ServicePort))
		}
		for name, port := range names {
			exp = append(exp, fmt.Sprintf("%s %s:%s", name, composeGateway, port))
		}
		slices.Sort(got)
		slices.Sort(exp)
		if !slices.Equal(got, exp) {
			return fmt.Errorf("catalog %v, want %v", got, exp)
		}
		return nil
	})
}

// down removes the project: its containers first, one at a time (see
// testenv.RemoveContainers), then docker-compose down for the network, then
// by ID whatever down left.
// logs returns the logs of a service's containers.
func (c *compose) logs(service string) string {
	out, err := c.compose("logs", "--no-color", service)
	if err != nil {
		c.t.Errorf("docker-compose logs %s: %v", service, err)
	}
	return out
}

func (c *compose) down() {
	t := c.t
	if t.Failed() {
		if out, err := c.compose("logs", "--no-color", "--tail", "40"); err == nil {
			t.Logf("compose logs:\n%s", out)
		}
	}
	filter := "label=com.docker.compose.project=" + c.project
	if err := removeComposeObjects(filter); err != nil {
		t.Error(err)
	}
	if _, err := c.compose("down", "-v", "--remove-orphans"); err != nil {
		t.Error(err)
	}
	if err := removeComposeObjects(filter); err != nil {
		t.Error(err)
	}
}

// removeComposeLeftovers removes what a run of this test that was killed
// before its clean-up left: its network would hold the address plan.
func removeComposeLeftovers(t *testing.T) {
	t.Helper()
	if err := removeComposeObjects("label=" + composeLabel); err != nil {
		t.Fatal(err)
	}
}

// removeComposeObjects removes the containers, one at a time, then the networks
// that match a docker filter.
func removeComposeObjects(filter string) error {
	out, err := testenv.Docker("ps", "-aq", "--no-trunc", "--filter", filter)
	if err != nil {
		return err
	}
	if err := testenv.RemoveContainers(strings.Fields(string(out))...); err != nil {
		return err
	}
	out, err = testenv.Docker("network", "ls", "-q", "--no-trunc", "--filter", filter)
	if err != nil {
		return err
	}
	for _, id := range strings.Fields(string(out)) {
		if _, err := testenv.Docker("network", "rm", id); err != nil && !strings.Contains(err.Error(), "No such network") {
			return err
		}
	}
	return nil
}

// publishedPort returns the host port a web container's port 80 is
// published on, checking it is published on the gateway only.
func publishedPort(t *testing.T, id string) string {
	t.Helper()
	out, err := testenv.Docker("port", id, "80/tcp")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Fields(string(out))
	if len(lines) != 1 || !strings.HasPrefix(lines[0], composeGateway+":") {
		t.Fatalf("port 80 of %.12s published on %q, want %s:<port> only", id, out, composeGateway)
	}
	return strings.TrimPrefix(lines[0], composeGateway+":")
}
