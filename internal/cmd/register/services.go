package main

import (
	"path"
	"sort"
	"strconv"
	"strings"

	dockerapi "github.com/fsouza/go-dockerclient"
)

// service is one Consul registration, in the field names of Consul's
// /v1/agent/service/register.
type service struct {
	ID      string
	Name    string
	Address string
	Port    int
	Tags    []string `json:",omitempty"`
}

// services returns what Registrator would register for a container: one
// service per published port, ordered by port. hostname goes into the IDs;
// hostIP replaces a binding to every host address.
func services(c *dockerapi.Container, hostname, hostIP string) []service {
	if c == nil || c.Config == nil || c.NetworkSettings == nil {
		return nil
	}
	type published struct {
		port    dockerapi.Port
		binding dockerapi.PortBinding
	}
	var ports []published
	for port, bindings := range c.NetworkSettings.Ports {
		for _, b := range bindings {
			if b.HostPort != "" {
				// Registrator takes the first binding: an engine that
				// publishes on 0.0.0.0 and :: lists both with one port.
				ports = append(ports, published{port, b})
				break
			}
		}
	}
	sort.Slice(ports, func(i, j int) bool {
		pi, _ := strconv.Atoi(ports[i].port.Port())
		pj, _ := strconv.Atoi(ports[j].port.Port())
		if pi != pj {
			return pi < pj
		}
		return ports[i].port.Proto() < ports[j].port.Proto()
	})

	image := strings.SplitN(path.Base(c.Config.Image), ":", 2)[0]
	name := strings.TrimPrefix(c.Name, "/")
	group := len(ports) > 1
	var out []service
	for _, p := range ports {
		meta, fromPort := metadata(c.Config, p.port.Port())
		if meta["ignore"] != "" {
			continue
		}
		hostPort, err := strconv.Atoi(p.binding.HostPort)
		if err != nil {
			continue
		}
		s := service{
			ID:      hostname + ":" + name + ":" + p.port.Port(),
			Name:    meta["name"],
			Address: p.binding.HostIP,
			Port:    hostPort,
			Tags:    tags(meta["tags"]),
		}
		if s.Name == "" {
			s.Name = image
		}
		if group && !fromPort["name"] {
			s.Name += "-" + p.port.Port()
		}
		if p.port.Proto() == "udp" {
			s.ID += ":udp"
			s.Tags = append(s.Tags, "udp")
		}
		if hostIP != "" && (s.Address == "" || s.Address == "0.0.0.0" || s.Address == "::") {
			s.Address = hostIP
		}
		out = append(out, s)
	}
	return out
}

// metadata reads the SERVICE_ variables that apply to one port, from the
// labels and then the environment, as Registrator does: SERVICE_<port>_KEY
// wins over SERVICE_KEY, the environment over labels. Keys are lower-cased;
// fromPort tells which came from a SERVICE_<port>_ variable.
func metadata(cfg *dockerapi.Config, port string) (meta map[string]string, fromPort map[string]bool) {
	var vars [][2]string
	for k, v := range cfg.Labels {
		vars = append(vars, [2]string{k, v})
	}
	for _, kv := range cfg.Env {
		k, v, _ := strings.Cut(kv, "=")
		vars = append(vars, [2]string{k, v})
	}
	meta, fromPort = map[string]string{}, map[string]bool{}
	for _, kv := range vars {
		key, ok := strings.CutPrefix(kv[0], "SERVICE_")
		if !ok || key == "" {
			continue
		}
		key = strings.ToLower(key)
		if p, rest, ok := strings.Cut(key, "_"); ok {
			if _, err := strconv.Atoi(p); err == nil {
				if p == port {
					meta[rest], fromPort[rest] = kv[1], true
				}
				continue
			}
		}
		if !fromPort[key] {
			meta[key] = kv[1]
		}
	}
	return meta, fromPort
}

// tags splits SERVICE_TAGS; Registrator's escaped comma (\,) is kept as a
// comma inside a tag.
func tags(s string) []string {
	var out []string
	var cur strings.Builder
	for i := 0; i < len(s); i++ {
		switch {
		case s[i] == '\\' && i+1 < len(s) && s[i+1] == ',':
			cur.WriteByte(',')
			i++
		case s[i] == ',':
			if cur.Len() > 0 {
				out = append(out, cur.String())
			}
			cur.Reset()
		default:
			cur.WriteByte(s[i])
		}
	}
	if cur.Len() > 0 {
		out = append(out, cur.String())
	}
	return out
}
