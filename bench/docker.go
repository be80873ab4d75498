package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/connectable/connectable/internal/testenv"
)

// dockerAPI speaks to the Docker Engine over its Unix socket: starting a
// hundred containers at once through the API measures the engine and
// connectable, not a hundred docker CLI processes.
type dockerAPI struct{ c *http.Client }

func newDockerAPI() *dockerAPI {
	sock := "/var/run/docker.sock"
	if h := os.Getenv("DOCKER_HOST"); strings.HasPrefix(h, "unix://") {
		sock = strings.TrimPrefix(h, "unix://")
	}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
		MaxIdleConnsPerHost: 200,
	}
	return &dockerAPI{c: &http.Client{Transport: tr, Timeout: 3 * time.Minute}}
}

func (d *dockerAPI) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		data, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(data)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://docker"+path, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := d.c.Do(req)
	if err != nil {
		return fmt.Errorf("docker %s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("docker %s %s: %s: %s", method, path, resp.Status, bytes.TrimSpace(data))
	}
	if out != nil {
		return json.Unmarshal(data, out)
	}
	return nil
}

// create creates (does not start) a labelled busybox container without a
// network, running script.
func (d *dockerAPI) create(ctx context.Context, name, runID string, labels map[string]string, script string) (string, error) {
	all := map[string]string{testLabel: "1", runLabel: runID}
	for k, v := range labels {
		all[k] = v
	}
	spec := map[string]any{
		"Image":      imageName,
		"Cmd":        []string{"sh", "-c", script},
		"Labels":     all,
		"HostConfig": map[string]any{"NetworkMode": "none"},
	}
	var out struct{ ID string }
	if err := d.do(ctx, "POST", "/containers/create?name="+url.QueryEscape(name), spec, &out); err != nil {
		return "", err
	}
	return out.ID, nil
}

func (d *dockerAPI) start(ctx context.Context, id string) error {
	return d.do(ctx, "POST", "/containers/"+id+"/start", nil, nil)
}

func (d *dockerAPI) pid(ctx context.Context, id string) (int, error) {
	var out struct{ State struct{ Pid int } }
	if err := d.do(ctx, "GET", "/containers/"+id+"/json", nil, &out); err != nil {
		return 0, err
	}
	if out.State.Pid == 0 {
		return 0, fmt.Errorf("container %.12s is not running", id)
	}
	return out.State.Pid, nil
}

// removeAll force-removes containers one at a time. Each removal returns
// once the engine has cleaned the container's network up, so no two of those
// clean-ups overlap: on Docker 20.10 two of them can deadlock the engine for
// good (moby/moby#46661; seen here once, with 50 removed at once).
func (d *dockerAPI) removeAll(ctx context.Context, ids []string) error {
	var errs []error
	for _, id := range ids {
		err := d.do(ctx, "DELETE", "/containers/"+id+"?force=1&v=1", nil, nil)
		if err != nil && !strings.Contains(err.Error(), "404") {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("%d of %d removals failed, first: %w", len(errs), len(ids), errs[0])
	}
	return nil
}

// removeRun force-removes every container this run labelled.
func (d *dockerAPI) removeRun(ctx context.Context, runID string) error {
	filters, _ := json.Marshal(map[string][]string{"label": {runLabel + "=" + runID}})
	var list []struct{ ID string }
	if err := d.do(ctx, "GET", "/containers/json?all=1&filters="+url.QueryEscape(string(filters)), nil, &list); err != nil {
		return err
	}
	ids := make([]string, len(list))
	for i, c := range list {
		ids[i] = c.ID
	}
	if len(ids) > 0 {
		logf("removing %d containers", len(ids))
	}
	return d.removeAll(ctx, ids)
}

// ensureImage builds the repository's test image (Debian's static busybox,
// imported, never pulled) unless it exists, as the tests do.
func ensureImage() error {
	_, err := testenv.EnsureBusyboxImage()
	return err
}
