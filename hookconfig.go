package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// hookConfigCmd is `connectable hook-config docker|podman`: it prints the
// configuration that runs the hook, or merges it into the engine's
// (--write): for Docker, the runtime in daemon.json (and, with
// --default-runtime, as every container's runtime); for Podman, a hooks.d
// file.
func hookConfigCmd(args []string, stdout, stderr io.Writer) int {
	usage := "usage: connectable hook-config docker [--default-runtime] [--name connectable] [--write /etc/docker/daemon.json]\n" +
		"       connectable hook-config podman [--write /etc/containers/oci/hooks.d]\n" +
		"  either with --binary PATH (default: this one) and the hook's --hook-socket, --hook-timeout, --hook-strict, --hook-log"
	if len(args) == 0 || (args[0] != "docker" && args[0] != "podman") {
		fmt.Fprintln(stderr, usage)
		return 2
	}
	engine := args[0]
	fs := flag.NewFlagSet("connectable hook-config "+engine, flag.ContinueOnError)
	fs.SetOutput(stderr)
	name := fs.String("name", "connectable", "docker: the runtime's name")
	def := fs.Bool("default-runtime", false, "docker: make it every container's runtime (default-runtime)")
	write := fs.String("write", "", "docker: daemon.json to merge into; podman: hooks.d directory to write connectable.json in; empty: print")
	binary := fs.String("binary", "", "path of the connectable binary on the host; empty: this one")
	hookOpts := map[string]*string{}
	for _, n := range runtimeFlags[1:] {
		hookOpts[n] = fs.String(n, "", "passed on to connectable hook")
	}
	if err := fs.Parse(args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	bin := *binary
	if bin == "" {
		self, err := os.Executable()
		if err != nil {
			fmt.Fprintf(stderr, "connectable hook-config: %v\n", err)
			return 1
		}
		bin = self
	}
	own := map[string]string{}
	for n, v := range hookOpts {
		if *v != "" {
			own[n] = *v
		}
	}
	var (
		out  []byte
		path string
		err  error
	)
	switch engine {
	case "docker":
		runtimeArgs := append([]string{"runtime"}, hookArgs(own)[2:]...)
		runtimeArgs = append(runtimeArgs, "--")
		rt := map[string]any{"path": bin, "runtimeArgs": runtimeArgs}
		if *write == "" {
			conf := map[string]any{"runtimes": map[string]any{*name: rt}}
			if *def {
				conf["default-runtime"] = *name
			}
			out, err = json.MarshalIndent(conf, "", "  ")
		} else {
			path = *write
			out, err = mergeDaemonJSON(path, *name, rt, *def)
		}
	case "podman":
		out, err = json.MarshalIndent(podmanHook(bin, own), "", "  ")
		if *write != "" {
			path = filepath.Join(*write, "connectable.json")
			if err == nil {
				err = os.MkdirAll(*write, 0o755)
			}
		}
	}
	if err != nil {
		fmt.Fprintf(stderr, "connectable hook-config: %v\n", err)
		return 1
	}
	out = append(out, '\n')
	if path == "" {
		_, _ = stdout.Write(out)
		return 0
	}
	if err := writeFileAtomic(path, out); err != nil {
		fmt.Fprintf(stderr, "connectable hook-config: %v\n", err)
		return 1
	}
	if engine == "docker" {
		fmt.Fprintf(stdout, "wrote %s; dockerd reads runtimes again on SIGHUP: kill -HUP $(pidof dockerd)\n", path)
	} else {
		fmt.Fprintf(stdout, "wrote %s; podman reads it at the next container start\n", path)
	}
	return 0
}

// podmanHook is the hooks.d entry that runs the hook before every
// container's process (unlabelled ones cost a map look-up in the daemon).
func podmanHook(bin string, own map[string]string) map[string]any {
	return map[string]any{
		"version": "1.0.0",
		"hook":    map[string]any{"path": bin, "args": hookArgs(own)},
		"when":    map[string]any{"always": true},
		"stages":  []string{"prestart"},
	}
}

// mergeDaemonJSON returns the daemon.json at path (or an empty one) with
// the runtime added, and made the default if def.
func mergeDaemonJSON(path, name string, rt map[string]any, def bool) ([]byte, error) {
	conf := map[string]any{}
	data, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return nil, err
	default:
		if err := json.Unmarshal(data, &conf); err != nil {
			return nil, fmt.Errorf("reading %s: %w", path, err)
		}
	}
	rts, _ := conf["runtimes"].(map[string]any)
	if rts == nil {
		rts = map[string]any{}
	}
	rts[name] = rt
	conf["runtimes"] = rts
	if def {
		conf["default-runtime"] = name
	}
	return json.MarshalIndent(conf, "", "  ")
}
