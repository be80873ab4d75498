package main

import (
	"errors"
	"flag"
	"io"
	"net"
	"reflect"
	"strings"
	"testing"
)

// FuzzParseConfig feeds parseConfig command lines (arguments separated by
// newlines) and environments ("NAME=value" lines), as an operator's unit
// file or docker run -e would. No input may panic; an accepted
// configuration must hold only values the daemon can use, and parsing the
// same input twice gives the same result.
func FuzzParseConfig(f *testing.F) {
	for _, s := range [][2]string{
		{"", ""},
		{"--dns\n127.0.0.1:8600\n--port=7000", "PORT=6500\nCONNECTABLE_CONNECT_TIMEOUT=750ms"},
		{"resolve\nredis.service.consul\n--dns=[::1]:53,127.0.0.1", ""},
		{"--port=70000", ""},
		{"--port=-1", "PORT=0x10"},
		{"--dns-min-ttl=0s\n--dns-stale=-1s", ""},
		{"--connect-timeout=9223372036854775807ns", "CONNECTABLE_DIAL_TIMEOUT=1e9h"},
		{"--admin=localhost", "CONNECTABLE_ADMIN=:0"},
		{"--admin=", "CONNECTABLE_ADMIN=[::1]:9876"},
		{"--log-level=DEBUG+3\n--log-format=json", "CONNECTABLE_LOG_LEVEL=nonsense"},
		{"--iptables=nft\n--iptables=legacy", "CONNECTABLE_IPTABLES=auto "},
		{"-h", ""},
		{"--\n--port=1", ""},
		{"--nosuchflag", "DOCKER_HOST=unix:///var/run/docker.sock"},
		{"--dns=,,,", "CONNECTABLE_DNS=999.1.1.1:53"},
		{"--dns=[fe80::1%eth0]:53", ""},
		{"--resync=1ns\n--drain-timeout=1µs", ""},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, argLines, envLines string) {
		var args []string
		if argLines != "" {
			args = strings.Split(argLines, "\n")
		}
		vars := map[string]string{}
		for _, line := range strings.Split(envLines, "\n") {
			if k, v, ok := strings.Cut(line, "="); ok {
				vars[k] = v
			}
		}
		getenv := func(k string) string { return vars[k] }
		c, pos, err := parseConfig("connectable", args, getenv, io.Discard)
		c2, pos2, err2 := parseConfig("connectable", args, getenv, io.Discard)
		if (err == nil) != (err2 == nil) || !reflect.DeepEqual(c, c2) || !reflect.DeepEqual(pos, pos2) {
			t.Fatalf("two parses differ: %+v %v %v / %+v %v %v", c, pos, err, c2, pos2, err2)
		}
		if err != nil {
			if c != nil || pos != nil {
				t.Fatalf("error %v with a configuration", err)
			}
			if !errors.Is(err, flag.ErrHelp) && err.Error() == "" {
				t.Fatalf("empty error message")
			}
			return
		}
		for name, d := range map[string]int64{"dns-timeout": int64(c.dnsTimeout), "dns-min-ttl": int64(c.dnsMinTTL),
			"dns-max-ttl": int64(c.dnsMaxTTL), "dns-negative-ttl": int64(c.dnsNegTTL), "dns-stale": int64(c.dnsStale),
			"connect-timeout": int64(c.connectTimeout), "dial-timeout": int64(c.dialTimeout),
			"drain-timeout": int64(c.drainTimeout), "resync": int64(c.resync)} {
			if d <= 0 {
				t.Fatalf("--%s accepted as %d", name, d)
			}
		}
		if c.admin != "" {
			if _, _, err := net.SplitHostPort(c.admin); err != nil {
				t.Fatalf("--admin accepted as %q: %v", c.admin, err)
			}
		}
		if c.iptables != "auto" && c.iptables != "nft" && c.iptables != "legacy" {
			t.Fatalf("--iptables accepted as %q", c.iptables)
		}
		if c.logFormat != "text" && c.logFormat != "json" {
			t.Fatalf("--log-format accepted as %q", c.logFormat)
		}
		for _, s := range c.dns {
			if host, port, err := net.SplitHostPort(s); err != nil || host == "" || port == "" || port == "0" {
				t.Fatalf("--dns accepted server %q", s)
			}
		}
	})
}
