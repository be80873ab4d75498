package admin

import (
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"
	"time"
)

// Status is the live state the /status endpoint serves.
type Status struct {
	Version    string      `json:"version"`
	Healthy    bool        `json:"healthy"`
	Namespaces []Namespace `json:"namespaces"`
	// Health is the socket path's endpoint health: endpoints a namespace
	// saw fail (suspect), the daemon confirmed dead, or a probe reached
	// lately. The relay's dials feed it too.
	Health []EndpointHealth `json:"endpoint_health,omitempty"`
}

// EndpointHealth is what the daemon holds about one endpoint.
type EndpointHealth struct {
	Endpoint string `json:"endpoint"`
	State    string `json:"state"` // suspect, dead or reachable
	// Namespaces names, by key, those whose evidence is held ("daemon"
	// for the daemon's own probes and dials).
	Namespaces []string  `json:"namespaces,omitempty"`
	Since      time.Time `json:"since"`
	NextProbe  time.Time `json:"next_probe,omitzero"`
	LastError  string    `json:"last_error,omitempty"`
}

// Namespace is one network namespace connectable serves.
type Namespace struct {
	Key        string      `json:"key"`
	NetNS      string      `json:"netns"`
	Containers []Container `json:"containers"`
	ProxyPort  uint16      `json:"proxy_port,omitempty"`
	IPv6       bool        `json:"ipv6"`
	Active     int64       `json:"active_connections"`
	Routes     []Route     `json:"routes"`
	// Error is the last set-up error, until a set-up succeeds.
	Error string `json:"error,omitempty"`
}

// Container names one container of a namespace.
type Container struct {
	ID   string `json:"id"`
	Name string `json:"name"`
}

// Route is one labelled port.
type Route struct {
	Port    uint16 `json:"port"`
	Service string `json:"service"`
	// Endpoints are those the last connection to the service tried, in
	// that order, with their passive-health state.
	Endpoints []Endpoint `json:"endpoints,omitempty"`
	// Paths say which data path serves the port, per family, and why;
	// without a socket path, the relay serves everything.
	Paths []RoutePath `json:"paths,omitempty"`
}

// RoutePath is how one family of a labelled port is served.
type RoutePath struct {
	Family string `json:"family"` // ipv4 (127.0.0.0/8) or ipv6 (::1)
	Path   string `json:"path"`   // socket or relay
	Why    string `json:"why"`
	// Endpoints are those the kernel chooses from, for the socket path.
	Endpoints []string `json:"endpoints,omitempty"`
}

// Endpoint is one backend address with its passive-health state.
type Endpoint struct {
	Addr    string `json:"addr"`
	Healthy bool   `json:"healthy"`
	// Refused is true when the target policy forbids dialling the
	// endpoint; LastError names the rule.
	Refused   bool      `json:"refused,omitempty"`
	Failures  int       `json:"failures,omitempty"`
	RetryAt   time.Time `json:"retry_at,omitzero"`
	LastError string    `json:"last_error,omitempty"`
}

// Status assembles the live state: the namespaces the reconciler is asked
// to set up, joined with what the proxy serves in each.
func (a *Admin) Status() Status {
	st := Status{Version: a.cfg.Version, Namespaces: []Namespace{}}
	byKey := map[string]*Namespace{}
	get := func(key string) *Namespace {
		if byKey[key] == nil {
			byKey[key] = &Namespace{Key: key}
		}
		return byKey[key]
	}
	if a.cfg.Watcher != nil {
		st.Healthy = a.cfg.Watcher.Healthy()
	}
	if a.cfg.Reconciler != nil {
		for _, w := range a.cfg.Reconciler.Status() {
			ns := get(w.Key)
			ns.NetNS, ns.Error = w.Path, w.Err
			for _, c := range w.Containers {
				ns.Containers = append(ns.Containers, Container{ID: c.ID, Name: c.Name})
			}
			for port, svc := range w.Routes {
				ns.Routes = append(ns.Routes, Route{Port: port, Service: svc})
			}
		}
	}
	if a.cfg.Proxy != nil {
		for _, p := range a.cfg.Proxy.Namespaces() {
			ns := get(p.Key)
			ns.NetNS, ns.ProxyPort, ns.IPv6, ns.Active = p.NetNS, p.Port, p.IPv6, p.Active
			// The proxy's routes are what is served now; they win.
			ns.Routes = ns.Routes[:0]
			for _, r := range p.Routes {
				route := Route{Port: r.Port, Service: r.Service}
				for _, e := range r.Endpoints {
					route.Endpoints = append(route.Endpoints, Endpoint{
						Addr: e.Addr.String(), Healthy: e.Healthy, Refused: e.Refused, Failures: e.Failures,
						RetryAt: e.RetryAt, LastError: e.LastError,
					})
				}
				ns.Routes = append(ns.Routes, route)
			}
		}
	}
	if sp := a.cfg.Socket; sp != nil {
		for _, h := range sp.Health() {
			st.Health = append(st.Health, EndpointHealth{
				Endpoint: h.Endpoint.Endpoint.String(), State: h.State, Namespaces: h.Namespaces,
				Since: h.Since, NextProbe: h.NextProbe, LastError: h.LastError,
			})
		}
		sort.Slice(st.Health, func(i, j int) bool { return st.Health[i].Endpoint < st.Health[j].Endpoint })
		for _, s := range sp.Status() {
			ns := byKey[s.Key]
			if ns == nil {
				continue
			}
			for i := range ns.Routes {
				if ns.Routes[i].Port != s.Port {
					continue
				}
				rp := RoutePath{Family: s.Family, Path: s.Path, Why: s.Why}
				for _, ep := range s.Endpoints {
					rp.Endpoints = append(rp.Endpoints, ep.String())
				}
				ns.Routes[i].Paths = append(ns.Routes[i].Paths, rp)
			}
		}
	}
	for _, ns := range byKey {
		sort.Slice(ns.Routes, func(i, j int) bool { return ns.Routes[i].Port < ns.Routes[j].Port })
		st.Namespaces = append(st.Namespaces, *ns)
	}
	sort.Slice(st.Namespaces, func(i, j int) bool { return st.Namespaces[i].Key < st.Namespaces[j].Key })
	return st
}

// WriteTable renders st for a person: one line per labelled port.
func WriteTable(w io.Writer, st Status) error {
	health := "healthy"
	if !st.Healthy {
		health = "UNHEALTHY (Docker event stream down or last resync failed)"
	}
	fmt.Fprintf(w, "connectable %s, %s, %d namespace(s)\n\n", st.Version, health, len(st.Namespaces))
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "CONTAINERS\tPORT\tSERVICE\tPATH\tPROXY\tACTIVE\tENDPOINTS (last tried order)")
	for _, ns := range st.Namespaces {
		var names []string
		for _, c := range ns.Containers {
			names = append(names, c.Name+" ("+c.ID+")")
		}
		who := strings.Join(names, ", ")
		if who == "" {
			who = short(ns.Key)
		}
		proxyPort := "-"
		if ns.ProxyPort != 0 {
			proxyPort = fmt.Sprint(ns.ProxyPort)
			if ns.IPv6 {
				proxyPort += " v4+v6"
			} else {
				proxyPort += " v4"
			}
		}
		if ns.Error != "" {
			fmt.Fprintf(tw, "%s\t-\t-\t-\t%s\t%d\tERROR: %s\n", who, proxyPort, ns.Active, ns.Error)
		}
		for _, r := range ns.Routes {
			var eps []string
			for _, e := range r.Endpoints {
				s := e.Addr
				if e.Refused {
					s += " (refused by the target policy)"
				} else if !e.Healthy {
					s += fmt.Sprintf(" (backing off, %d failures)", e.Failures)
				}
				eps = append(eps, s)
			}
			endpoints := strings.Join(eps, ", ")
			if endpoints == "" {
				endpoints = "(no connection yet)"
			}
			fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%d\t%s\n", who, r.Port, r.Service, pathOf(r), proxyPort, ns.Active, endpoints)
		}
	}
	return tw.Flush()
}

// pathOf says which path serves r: relay, socket, or each family's.
func pathOf(r Route) string {
	if len(r.Paths) == 0 {
		return "relay"
	}
	var parts []string
	same := true
	for _, p := range r.Paths {
		parts = append(parts, p.Family+" "+p.Path)
		same = same && p.Path == r.Paths[0].Path
	}
	if same {
		return r.Paths[0].Path
	}
	return strings.Join(parts, ", ")
}

func short(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}
