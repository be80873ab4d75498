package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"path"
	"strconv"
	"strings"
	"time"

	"github.com/connectable/connectable/policy"
	"github.com/connectable/connectable/resolver"
)

// config is everything the daemon and its subcommands can be told.
type config struct {
	dockerHost     string
	port           uint16
	dns            []string
	dnsTimeout     time.Duration
	dnsMinTTL      time.Duration
	dnsMaxTTL      time.Duration
	dnsNegTTL      time.Duration
	dnsStale       time.Duration
	dnsCacheSize   int
	connectTimeout time.Duration
	dialTimeout    time.Duration
	connectStagger time.Duration
	backendTimeout time.Duration
	drainTimeout   time.Duration
	halfClose      time.Duration
	iptables       string
	resync         time.Duration
	logLevel       slog.Level
	logFormat      string
	admin          string
	// Tenant isolation (README "Security model").
	allowTargets  []netip.Prefix
	denyTargets   []netip.Prefix
	labelAllow    []string
	maxConnsPerNS int // 0: derived from the file limit
	maxConns      int // 0: derived from the file limit
	maxDialsPerNS int
	// The socket data path (README "Data paths").
	datapath string // relay, socket or auto
	bpfDir   string
	cgroup2  string // "": found in /proc/self/mountinfo
	// The OCI hook (README "No start race"; hook.go, hookserver.go).
	hookSocket  string // "": the daemon opens none
	hookTimeout time.Duration
	hookStrict  bool
	hookLog     string // syslog, stderr or a file
}

// option is one flag with the environment variable that sets its default.
type option struct {
	name, env, def, usage string
	set                   func(c *config, v string) error
}

var options = []option{
	{"docker-host", "DOCKER_HOST", "", "Docker Engine endpoint (unix:// or tcp://); empty: the local socket. DOCKER_TLS_VERIFY and DOCKER_CERT_PATH apply as for the docker CLI",
		func(c *config, v string) error { c.dockerHost = v; return nil }},
	{"port", "PORT", "0", "proxy port inside each container's namespace; 0: reuse the port of a previous run, else let the kernel pick a free one",
		func(c *config, v string) error {
			p, err := strconv.ParseUint(v, 10, 16)
			if err != nil {
				return errors.New("not a port number (0-65535)")
			}
			c.port = uint16(p)
			return nil
		}},
	{"dns", "CONNECTABLE_DNS", "", "DNS servers for SRV lookups, ADDR[:PORT][,ADDR[:PORT]...] (port 53 if omitted); empty: the nameservers of /etc/resolv.conf",
		func(c *config, v string) (err error) {
			if v == "" {
				c.dns = nil
				return nil
			}
			c.dns, err = resolver.ParseServers(v)
			return err
		}},
	{"dns-timeout", "CONNECTABLE_DNS_TIMEOUT", "2s", "timeout of one DNS query to one server", duration(func(c *config) *time.Duration { return &c.dnsTimeout })},
	{"dns-min-ttl", "CONNECTABLE_DNS_MIN_TTL", "1s", "shortest time an answer is cached (Consul's TTL is 0)", duration(func(c *config) *time.Duration { return &c.dnsMinTTL })},
	{"dns-max-ttl", "CONNECTABLE_DNS_MAX_TTL", "5m", "longest time an answer is cached", duration(func(c *config) *time.Duration { return &c.dnsMaxTTL })},
	{"dns-negative-ttl", "CONNECTABLE_DNS_NEGATIVE_TTL", "1s", "time a missing name, an empty answer or a failed lookup (without a stale answer to use) is cached", duration(func(c *config) *time.Duration { return &c.dnsNegTTL })},
	{"dns-stale", "CONNECTABLE_DNS_STALE", "1m", "how long an expired answer is still used while every DNS server fails", duration(func(c *config) *time.Duration { return &c.dnsStale })},
	{"dns-cache-size", "CONNECTABLE_DNS_CACHE_SIZE", "10000", "most distinct label values whose answers are cached; beyond it, spent entries and then those not used lately are evicted",
		func(c *config, v string) error {
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 {
				return errors.New("must be a whole number, at least 1")
			}
			c.dnsCacheSize = n
			return nil
		}},
	{"connect-timeout", "CONNECTABLE_CONNECT_TIMEOUT", "3s", "timeout of one connection attempt to one endpoint", duration(func(c *config) *time.Duration { return &c.connectTimeout })},
	{"connect-stagger", "CONNECTABLE_CONNECT_STAGGER", "250ms", "how long a dial waits for one endpoint before trying the next alongside it (the first to connect wins), so that a silent host costs this rather than the connect timeout", duration(func(c *config) *time.Duration { return &c.connectStagger })},
	{"backend-timeout", "CONNECTABLE_BACKEND_TIMEOUT", "30s", "how long a relayed backend connection, or a connection the socket path sent straight to an endpoint, may stay silent (data unacknowledged, or keepalive probes unanswered) before the kernel ends it, as when its host vanished", duration(func(c *config) *time.Duration { return &c.backendTimeout })},
	{"dial-timeout", "CONNECTABLE_DIAL_TIMEOUT", "10s", "bound on resolving and trying every endpoint for one client connection", duration(func(c *config) *time.Duration { return &c.dialTimeout })},
	{"drain-timeout", "CONNECTABLE_DRAIN_TIMEOUT", "10s", "on shutdown, how long live connections may finish before they are closed", duration(func(c *config) *time.Duration { return &c.drainTimeout })},
	{"half-close-timeout", "CONNECTABLE_HALF_CLOSE_TIMEOUT", "1m", "once one side of a relayed connection has closed, how long the other may stay silent before the connection is closed", duration(func(c *config) *time.Duration { return &c.halfClose })},
	{"iptables", "CONNECTABLE_IPTABLES", "auto", "iptables backend: auto (the one that already holds the host's rules), nft or legacy",
		func(c *config, v string) error {
			switch v {
			case "auto", "nft", "legacy":
				c.iptables = v
				return nil
			}
			return errors.New("must be auto, nft or legacy")
		}},
	{"resync", "CONNECTABLE_RESYNC", "30s", "interval of the full resynchronisation with the Docker Engine", duration(func(c *config) *time.Duration { return &c.resync })},
	{"admin", "CONNECTABLE_ADMIN", "127.0.0.1:9876", "address of the read-only admin endpoint (/metrics, /status, /healthz); empty disables it",
		func(c *config, v string) error {
			if v == "" {
				c.admin = ""
				return nil
			}
			if _, _, err := net.SplitHostPort(v); err != nil {
				return errors.New("must be HOST:PORT, e.g. 127.0.0.1:9876")
			}
			c.admin = v
			return nil
		}},
	{"allow-targets", "CONNECTABLE_ALLOW_TARGETS", "", "endpoint ranges to allow although denied by default, CIDR[,CIDR...] (loopback, link-local, cloud metadata, unspecified, multicast, broadcast and the NAT64, 6to4 and IPv4-compatible forms of these are denied; the most specific prefix wins, deny on a tie)",
		func(c *config, v string) (err error) { c.allowTargets, err = policy.ParsePrefixes(v); return err }},
	{"deny-targets", "CONNECTABLE_DENY_TARGETS", "", "further endpoint ranges to deny, CIDR[,CIDR...] (e.g. the bridge subnets where --icc=false matters)",
		func(c *config, v string) (err error) { c.denyTargets, err = policy.ParsePrefixes(v); return err }},
	{"label-allow", "CONNECTABLE_LABEL_ALLOW", "", "label values allowed, PATTERN[,PATTERN...], case-insensitive, * matching any characters (e.g. *.service.consul); a label outside them is skipped; empty: any",
		func(c *config, v string) (err error) { c.labelAllow, err = parseLabelAllow(v); return err }},
	{"max-conns-per-namespace", "CONNECTABLE_MAX_CONNS_PER_NAMESPACE", "0", "connections one namespace may have dialled or relayed at once; more are reset; 0: an eighth of what the file limit allows (two descriptors a connection)",
		count(func(c *config) *int { return &c.maxConnsPerNS })},
	{"max-conns", "CONNECTABLE_MAX_CONNS", "0", "connections all namespaces together may have at once; 0: what the file limit allows after a reserve for DNS, Docker, admin and listeners",
		count(func(c *config) *int { return &c.maxConns })},
	{"max-dials-per-namespace", "CONNECTABLE_MAX_DIALS_PER_NAMESPACE", "128", "dial phases one namespace may have in flight at once, each up to three overlapping attempts to endpoints (--connect-stagger); further connections wait their turn within --dial-timeout",
		func(c *config, v string) error {
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 {
				return errors.New("must be a positive number")
			}
			c.maxDialsPerNS = n
			return nil
		}},
	{"datapath", "CONNECTABLE_DATAPATH", "auto", "data path: auto (the socket path where the kernel and the daemon's surroundings allow it, with one log line saying why not where they do not, else the relay), relay (every connection through the proxy) or socket (connect() sent straight to an endpoint by eBPF programs where the namespace can reach it, the relay beneath for the rest; fail if the programs cannot load)",
		func(c *config, v string) error {
			switch v {
			case "relay", "socket", "auto":
				c.datapath = v
				return nil
			}
			return errors.New("must be relay, socket or auto")
		}},
	{"bpf-dir", "CONNECTABLE_BPF_DIR", "/sys/fs/bpf/connectable", "where the socket path pins its programs and maps, on a bpffs (a bpffs is mounted at /sys/fs/bpf if none is); what is pinned keeps serving while the daemon is stopped or restarts, until connectable cleanup; one daemon per directory (a lock)",
		func(c *config, v string) error {
			if !strings.HasPrefix(v, "/") {
				return errors.New("must be an absolute path")
			}
			c.bpfDir = path.Clean(v)
			return nil
		}},
	{"cgroup2", "CONNECTABLE_CGROUP2", "", "the cgroup2 root the socket path's programs attach to; empty: found among the mounts (/sys/fs/cgroup, or /sys/fs/cgroup/unified on a hybrid host)",
		func(c *config, v string) error {
			if v != "" && !strings.HasPrefix(v, "/") {
				return errors.New("must be an absolute path")
			}
			c.cgroup2 = v
			return nil
		}},
	{"hook-socket", "CONNECTABLE_HOOK_SOCKET", defaultHookSocket, "Unix socket (root only) on which the daemon serves `connectable hook`, and which the hook asks; empty: the daemon opens none",
		func(c *config, v string) error {
			if v != "" && !strings.HasPrefix(v, "/") {
				return errors.New("must be an absolute path")
			}
			c.hookSocket = v
			return nil
		}},
	{"hook-timeout", "CONNECTABLE_HOOK_TIMEOUT", "2s", "connectable hook: how long a container's start waits for its set-up before it goes on without", duration(func(c *config) *time.Duration { return &c.hookTimeout })},
	{"hook-strict", "CONNECTABLE_HOOK_STRICT", "false", "connectable hook: fail the start of a labelled container that could not be set up within --hook-timeout because the daemon was down, slow or failing (labels it refuses still start, as without the hook)",
		func(c *config, v string) (err error) { c.hookStrict, err = strconv.ParseBool(v); return err }},
	{"hook-log", "CONNECTABLE_HOOK_LOG", "syslog", "connectable hook: where it says why a labelled container started without its set-up: syslog, stderr or a file to append to (the runtime discards a hook's output when it succeeds)",
		func(c *config, v string) error { c.hookLog = v; return nil }},
	{"log-level", "CONNECTABLE_LOG_LEVEL", "info", "log level: debug, info, warn or error (debug logs every connection)",
		func(c *config, v string) error { return c.logLevel.UnmarshalText([]byte(v)) }},
	{"log-format", "CONNECTABLE_LOG_FORMAT", "text", "log format: text or json",
		func(c *config, v string) error {
			if v != "text" && v != "json" {
				return errors.New("must be text or json")
			}
			c.logFormat = v
			return nil
		}},
}

// duration returns a setter for a positive duration field.
func duration(field func(*config) *time.Duration) func(*config, string) error {
	return func(c *config, v string) error {
		d, err := time.ParseDuration(v)
		if err != nil {
			return errors.New("not a duration (e.g. 500ms, 2s, 1m)")
		}
		if d <= 0 {
			return errors.New("must be positive")
		}
		*field(c) = d
		return nil
	}
}

// count returns a setter for a number that is 0 (derived) or positive.
func count(field func(*config) *int) func(*config, string) error {
	return func(c *config, v string) error {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			return errors.New("must be 0 (derived from the file limit) or a positive number")
		}
		*field(c) = n
		return nil
	}
}

// parseLabelAllow parses --label-allow: patterns as path.Match takes them,
// compared with lower-cased label values.
func parseLabelAllow(v string) ([]string, error) {
	var out []string
	for p := range strings.SplitSeq(v, ",") {
		p = strings.ToLower(strings.TrimSpace(p))
		if p == "" {
			continue
		}
		if _, err := path.Match(p, ""); err != nil {
			return nil, fmt.Errorf("%q is not a pattern: %w", p, err)
		}
		out = append(out, p)
	}
	return out, nil
}

// labelAllowed checks a label value against --label-allow; nil patterns
// allow everything.
func labelAllowed(patterns []string, value string) error {
	if len(patterns) == 0 {
		return nil
	}
	v := strings.ToLower(value)
	for _, p := range patterns {
		if ok, _ := path.Match(p, v); ok {
			return nil
		}
	}
	return fmt.Errorf("%q is outside --label-allow %s", value, strings.Join(patterns, ","))
}

// optionValue adapts an option to flag.Value.
type optionValue struct {
	c   *config
	opt *option
	cur string
}

func (v *optionValue) String() string {
	if v == nil || v.opt == nil {
		return ""
	}
	return v.cur
}

func (v *optionValue) Set(s string) error {
	if err := v.opt.set(v.c, s); err != nil {
		return err
	}
	v.cur = s
	return nil
}

// parseConfig reads the environment (through getenv) and then args, which
// may hold flags before and after positional arguments. It returns the
// positional arguments.
func parseConfig(name string, args []string, getenv func(string) string, stderr io.Writer) (*config, []string, error) {
	c := &config{}
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	for i := range options {
		o := &options[i]
		v := &optionValue{c: c, opt: o}
		if err := v.Set(o.def); err != nil {
			return nil, nil, fmt.Errorf("default of --%s: %w", o.name, err) // a bug, caught by tests
		}
		if e := getenv(o.env); e != "" {
			if err := v.Set(e); err != nil {
				return nil, nil, fmt.Errorf("invalid value %q for environment variable %s: %w", e, o.env, err)
			}
		}
		fs.Var(v, o.name, fmt.Sprintf("%s (env %s)", o.usage, o.env))
	}
	fs.Usage = func() { usage(fs, stderr) }
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, nil, err
		}
		args = fs.Args()
		if len(args) == 0 {
			break
		}
		positional = append(positional, args[0])
		args = args[1:]
	}
	return c, positional, nil
}

func usage(fs *flag.FlagSet, w io.Writer) {
	fmt.Fprintf(w, `Usage:
  connectable [options]                  run the daemon
  connectable resolve NAME [options]     print the endpoints one new connection to NAME would try
  connectable status [--admin ADDR]      print what a running daemon serves, as a table
  connectable cleanup [--bpf-dir DIR] [--docker-host URL]
                                         after the daemon stopped for good: remove the socket
                                         path from the kernel (its programs, links and maps)
                                         and the relay's rules from the engine's containers
  connectable version                    print the version
  connectable hook [options]             OCI hook: set up the container on stdin's OCI state before it runs
  connectable runtime [options] [--] RUNC-ARGS...
                                         OCI runtime that adds the hook and executes runc (for Docker)
  connectable hook-config docker|podman [--default-runtime] [--write PATH]
                                         print or install the configuration that runs the hook

Containers declare what they need with labels: connect.<port>=<service>.
<service> is a DNS name (SRV lookup), host:port or ip:port.

Signals: SIGTERM and SIGINT stop the daemon. The relay keeps serving while
the connections it had live end (within --drain-timeout), then stops
listening and gives the ones it accepted meanwhile a second more. Both paths
stay for the next start: the relay's rules, whose connects wait (in SYN
retries) for the next start to listen behind them, and the socket path in
the kernel, serving its ports. So a restart (an upgrade) refuses no connect.
To remove them for good, stop the daemon and run connectable cleanup with
the same --bpf-dir and --docker-host. One daemon per --bpf-dir: a second one
refuses to start.

Options (each also read from the environment variable shown; flags win):
`)
	fs.VisitAll(func(f *flag.Flag) {
		def := ""
		for _, o := range options {
			if o.name == f.Name {
				def = o.def
			}
		}
		fmt.Fprintf(w, "  --%s\n    \t%s (default %q)\n", f.Name, strings.ReplaceAll(f.Usage, "\n", " "), def)
	})
	fmt.Fprint(w, `
Environment only:
  GOMAXPROCS
    	threads running Go code at once (default: half the CPUs, at least 1;
    	the clients and backends connectable relays for share those CPUs)
`)
}

// newLogger builds the process's logger from the configuration.
func newLogger(c *config, w io.Writer) *slog.Logger {
	opts := &slog.HandlerOptions{Level: c.logLevel}
	if c.logFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}
