package resolver

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"

	"github.com/connectable/connectable/internal/port"
)

// valueKind says how a label value is resolved.
type valueKind uint8

const (
	kindSRV      valueKind = iota + 1 // a DNS name: SRV lookup of exactly that name
	kindHostPort                      // host:port: A and AAAA of host, with that port
	kindAddrPort                      // ip:port: itself
)

// parsedValue is a label value taken apart.
type parsedValue struct {
	kind valueKind
	name string         // fully qualified, lower case (kindSRV, kindHostPort)
	port uint16         // kindHostPort
	addr netip.AddrPort // kindAddrPort
}

// Validate checks the syntax of a label value: a DNS name (looked up as
// SRV), host:port (looked up as A and AAAA) or ip:port ([ip6]:port for IPv6).
// The error names the value and says what is wrong with it.
func Validate(value string) error {
	_, err := parseValue(value)
	return err
}

func parseValue(value string) (parsedValue, error) {
	bad := func(format string, args ...any) (parsedValue, error) {
		return parsedValue{}, &Error{Kind: ErrInvalidValue, Name: value, Err: fmt.Errorf(format, args...)}
	}
	if value == "" {
		return bad("empty")
	}
	if strings.TrimSpace(value) != value {
		return bad("leading or trailing space")
	}
	if !strings.Contains(value, ":") {
		if _, err := netip.ParseAddr(value); err == nil {
			return bad("an IP address needs a port (ip:port)")
		}
		if err := checkName(value); err != nil {
			return bad("%v", err)
		}
		return parsedValue{kind: kindSRV, name: canonical(value)}, nil
	}
	host, portStr, err := net.SplitHostPort(value)
	if err != nil {
		if _, err := netip.ParseAddr(value); err == nil {
			return bad("an IPv6 address needs a port, written [ip6]:port")
		}
		if i := strings.LastIndexByte(value, ':'); i > 0 {
			if _, err := netip.ParseAddr(value[:i]); err == nil {
				return bad("an IPv6 address with a port is written [ip6]:port")
			}
		}
		return bad("not host:port: %v", errors.Unwrap(err))
	}
	if portStr == "" {
		return bad("missing port")
	}
	// One rule for ports everywhere: connect.080 is no label key, so
	// web:080 is no value either.
	pt, err := port.Parse(portStr)
	if err != nil {
		return bad("%v", err)
	}
	if ip, err := netip.ParseAddr(host); err == nil {
		if ip.Zone() != "" {
			return bad("an address with a zone cannot be reached from a container")
		}
		if ip.IsUnspecified() {
			return bad("unspecified address %s", ip)
		}
		return parsedValue{kind: kindAddrPort, addr: netip.AddrPortFrom(ip, pt)}, nil
	}
	if strings.HasPrefix(value, "[") {
		return bad("%q in brackets is not an IPv6 address", host)
	}
	if err := checkName(host); err != nil {
		return bad("host: %v", err)
	}
	return parsedValue{kind: kindHostPort, name: canonical(host), port: pt}, nil
}

// checkName checks a DNS name: labels of letters, digits, '-' and '_' (SRV
// names such as _redis._tcp.service.consul), none empty or longer than 63
// bytes, none starting or ending with '-', at most 253 bytes in all; one
// trailing dot is allowed.
func checkName(s string) error {
	name := strings.TrimSuffix(s, ".")
	if name == "" {
		return errors.New("empty name")
	}
	if len(name) > 253 {
		return fmt.Errorf("name longer than 253 bytes (%d)", len(name))
	}
	for label := range strings.SplitSeq(name, ".") {
		if label == "" {
			return errors.New("empty label")
		}
		if len(label) > 63 {
			return fmt.Errorf("label %q longer than 63 bytes", label)
		}
		if label[0] == '-' || label[len(label)-1] == '-' {
			return fmt.Errorf("label %q starts or ends with '-'", label)
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '_') {
				return fmt.Errorf("character %q not allowed in a DNS name", c)
			}
		}
	}
	return nil
}

// canonical returns name fully qualified and in lower case, the form used
// in queries and to compare owner names.
func canonical(name string) string {
	name = strings.ToLower(name)
	if !strings.HasSuffix(name, ".") {
		name += "."
	}
	return name
}

// ParseServers parses a list of DNS servers as given to --dns or in
// CONNECTABLE_DNS: "ADDR[,ADDR...]" where ADDR is ip, ip:port, ip6 or
// [ip6]:port; the port defaults to 53. It returns "ip:port" strings
// ("[ip6]:port" for IPv6) for Config.Servers. An empty or blank s yields no
// servers (meaning: use /etc/resolv.conf). The error names the bad item.
func ParseServers(s string) ([]string, error) {
	if strings.TrimSpace(s) == "" {
		return nil, nil
	}
	var out []string
	for item := range strings.SplitSeq(s, ",") {
		item = strings.TrimSpace(item)
		ap, err := parseServer(item)
		if err != nil {
			return nil, fmt.Errorf("dns server %q: %w", item, err)
		}
		out = append(out, ap.String())
	}
	return out, nil
}

// parseServer parses one DNS server address, with port 53 by default.
func parseServer(s string) (netip.AddrPort, error) {
	if s == "" {
		return netip.AddrPort{}, errors.New("empty item")
	}
	bare := s
	if strings.HasPrefix(s, "[") && strings.HasSuffix(s, "]") {
		bare = s[1 : len(s)-1]
	}
	if strings.ContainsAny(bare, "[]") {
		bare = "" // unbalanced: left to SplitHostPort to reject
	}
	addr, err := netip.ParseAddr(bare)
	if err == nil {
		if bare != s && addr.Is4() {
			return netip.AddrPort{}, errors.New("brackets around an IPv4 address")
		}
		return netip.AddrPortFrom(addr, 53), nil
	}
	host, portStr, err := net.SplitHostPort(s)
	if err != nil {
		return netip.AddrPort{}, errors.New("not an IP address, ip:port or [ip6]:port")
	}
	addr, err = netip.ParseAddr(host)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("%q is not an IP address", host)
	}
	if addr.Is6() && !strings.HasPrefix(s, "[") {
		return netip.AddrPort{}, errors.New("an IPv6 address with a port is written [ip6]:port")
	}
	if portStr == "" {
		return netip.AddrPort{}, errors.New("missing port")
	}
	pt, err := port.Parse(portStr)
	if err != nil {
		return netip.AddrPort{}, err
	}
	return netip.AddrPortFrom(addr, pt), nil
}
