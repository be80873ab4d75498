package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
)

// `connectable runtime` is an OCI runtime for Docker, the way NVIDIA's
// container runtime is one: for `create` (and `run`) it adds
// `connectable hook` to the bundle's config.json, after the engine's own
// network set-up (libnetwork's prestart hook), then executes runc with the
// arguments it was given, whatever the command. Registered in daemon.json:
//
//	{"runtimes": {"connectable": {"path": "/usr/local/bin/connectable",
//	    "runtimeArgs": ["runtime", "--"]}}}
//
// Its own options come first, before "--": --runc (the runtime to execute;
// default runc on PATH) and the hook's --hook-socket, --hook-timeout,
// --hook-strict and --hook-log, which it passes on to the hook.

// runtimeFlags are the options `connectable runtime` takes; every other one
// is the runtime's.
var runtimeFlags = []string{"runc", "hook-socket", "hook-timeout", "hook-strict", "hook-log"}

// runtimeCmd is `connectable runtime`. It only returns on failure.
func runtimeCmd(args []string, getenv func(string) string, stderr io.Writer) int {
	own, rest, err := splitRuntimeArgs(args)
	if err != nil {
		fmt.Fprintf(stderr, "connectable runtime: %v\n", err)
		return 2
	}
	runc := own["runc"]
	if runc == "" {
		runc = getenv("CONNECTABLE_RUNC")
	}
	if runc == "" {
		runc = "runc"
	}
	path, err := exec.LookPath(runc)
	if err != nil {
		fmt.Fprintf(stderr, "connectable runtime: finding the runtime to execute: %v\n", err)
		return 1
	}
	if cmd, bundle := runcCommand(rest); cmd == "create" || cmd == "run" {
		self, err := os.Executable()
		if err == nil {
			err = addHook(filepath.Join(bundle, "config.json"), self, hookArgs(own))
		}
		if err != nil {
			// Never worse off: the container runs without the hook,
			// and the daemon sets it up at its start event as usual.
			fmt.Fprintf(stderr, "connectable runtime: adding the hook: %v\n", err)
			if own["hook-strict"] == "true" {
				return 1
			}
		}
	}
	err = syscall.Exec(path, append([]string{filepath.Base(runc)}, rest...), os.Environ())
	fmt.Fprintf(stderr, "connectable runtime: executing %s: %v\n", path, err)
	return 1
}

// splitRuntimeArgs takes the runtime's own options off the front of args,
// up to "--" or the first argument that is not one of them.
func splitRuntimeArgs(args []string) (own map[string]string, rest []string, err error) {
	own = make(map[string]string)
	for len(args) > 0 {
		a := args[0]
		if a == "--" {
			return own, args[1:], nil
		}
		name, value, hasValue := strings.Cut(strings.TrimPrefix(a, "--"), "=")
		if !strings.HasPrefix(a, "--") || !slices.Contains(runtimeFlags, name) {
			break
		}
		args = args[1:]
		switch {
		case hasValue:
		case name == "hook-strict":
			value = "true"
		case len(args) == 0:
			return nil, nil, fmt.Errorf("--%s needs a value", name)
		default:
			value, args = args[0], args[1:]
		}
		own[name] = value
	}
	return own, args, nil
}

// hookArgs are the hook's arguments (argv, with argv[0]) in config.json.
func hookArgs(own map[string]string) []string {
	args := []string{"connectable", "hook"}
	for _, name := range runtimeFlags[1:] {
		if v, ok := own[name]; ok {
			args = append(args, "--"+name+"="+v)
		}
	}
	return args
}

// runcGlobalsWithValue are runc's global options that take a value.
var runcGlobalsWithValue = []string{"--root", "--log", "--log-format", "--criu", "--rootless"}

// runcCommand finds the command among runc's arguments and, for create and
// run, the bundle (default: the working directory).
func runcCommand(args []string) (cmd, bundle string) {
	i := 0
	for ; i < len(args); i++ {
		a := args[i]
		if !strings.HasPrefix(a, "-") {
			break
		}
		if slices.Contains(runcGlobalsWithValue, a) {
			i++ // its value
		}
	}
	if i >= len(args) {
		return "", ""
	}
	cmd, bundle = args[i], "."
	for j := i + 1; j < len(args); j++ {
		a := args[j]
		switch {
		case (a == "--bundle" || a == "-b") && j+1 < len(args):
			bundle = args[j+1]
			j++
		case strings.HasPrefix(a, "--bundle="), strings.HasPrefix(a, "-b="):
			_, bundle, _ = strings.Cut(a, "=")
		}
	}
	return cmd, bundle
}

// ociHook is one hook of config.json, every field the specification has.
type ociHook struct {
	Path    string   `json:"path"`
	Args    []string `json:"args,omitempty"`
	Env     []string `json:"env,omitempty"`
	Timeout *int     `json:"timeout,omitempty"`
}

// addHook adds the hook (self with args) to the configuration at path,
// after the engine's network set-up: in the stage that holds libnetwork's
// hook, else at the end of prestart. It does nothing if the hook is there
// already. The file is replaced whole, with its mode kept.
func addHook(path, self string, args []string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var cfg map[string]json.RawMessage
	if err := json.Unmarshal(data, &cfg); err != nil {
		return fmt.Errorf("reading %s: %w", path, err)
	}
	hooks := map[string][]ociHook{}
	if raw, ok := cfg["hooks"]; ok && string(raw) != "null" {
		if err := json.Unmarshal(raw, &hooks); err != nil {
			return fmt.Errorf("reading the hooks of %s: %w", path, err)
		}
	}
	stage := "prestart"
	for _, s := range []string{"createRuntime", "prestart"} {
		if slices.ContainsFunc(hooks[s], isLibnetworkHook) {
			stage = s
		}
	}
	for _, hs := range hooks {
		if slices.ContainsFunc(hs, func(h ociHook) bool { return h.Path == self && len(h.Args) > 1 && h.Args[1] == "hook" }) {
			return nil
		}
	}
	hooks[stage] = append(hooks[stage], ociHook{Path: self, Args: args})
	if cfg["hooks"], err = json.Marshal(hooks); err != nil {
		return err
	}
	out, err := json.Marshal(cfg)
	if err != nil {
		return err
	}
	return writeFileAtomic(path, out)
}

func isLibnetworkHook(h ociHook) bool {
	return len(h.Args) > 0 && h.Args[0] == "libnetwork-setkey"
}

// writeFileAtomic replaces path with data through a temporary file in the
// same directory, keeping path's mode (0644 for a new file).
func writeFileAtomic(path string, data []byte) error {
	mode := os.FileMode(0o644)
	if fi, err := os.Stat(path); err == nil {
		mode = fi.Mode().Perm()
	} else if !errors.Is(err, os.ErrNotExist) {
		return err
	}
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name()) // fails once renamed
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("writing %s: %w", f.Name(), err)
	}
	if err := f.Chmod(mode); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return fmt.Errorf("replacing %s: %w", path, err)
	}
	return nil
}
