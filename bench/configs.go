package main

import (
	"fmt"
	"runtime"
	"strings"
)

// bodySize is the size of the backend's HTTP response body.
const bodySize = 1024

// backendNginxConf serves a fixed 1 KiB body on port 80 from the backend
// namespace, to every contender alike. Keep-alive connections are never cut
// by a request count, so wrk measures keep-alive only.
func backendNginxConf(dir string) string {
	return fmt.Sprintf(`# Backend for the benchmark: a fixed %[2]d-byte body.
worker_processes auto;
worker_rlimit_nofile 16384;
daemon off;
pid %[1]s/backend-nginx.pid;
error_log %[1]s/backend-nginx.error.log error;
events { worker_connections 8192; }
http {
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 120s;
    default_type text/plain;
    client_body_temp_path %[1]s/be-body;
    proxy_temp_path %[1]s/be-proxy;
    fastcgi_temp_path %[1]s/be-fastcgi;
    uwsgi_temp_path %[1]s/be-uwsgi;
    scgi_temp_path %[1]s/be-scgi;
    server {
        listen %[3]d backlog=4096;
        location / { return 200 "%[4]s"; }
    }
}
`, dir, bodySize, webPort, strings.Repeat("x", bodySize))
}

// haproxyConf is HAProxy in TCP mode with one thread per CPU and no
// logging (HAProxy logs nothing without a log directive). maxconn is raised
// from the default so 2000 held connections fit; HAProxy raises its own
// file limit to match.
func haproxyConf() string {
	var b strings.Builder
	fmt.Fprintf(&b, `global
    nbthread %d
    maxconn 8000

defaults
    mode tcp
    maxconn 8000
    timeout connect 5s
    timeout client 1h
    timeout server 1h
`, runtime.NumCPU())
	for _, l := range []struct {
		name       string
		port, dest int
	}{{"web", hWeb, webPort}, {"iperf", hIperf, iperfPort}, {"hold", hHold, holdPort}} {
		fmt.Fprintf(&b, "\nlisten %s\n    bind 127.0.0.1:%d\n    server be %s:%d\n", l.name, l.port, beClientAddr, l.dest)
	}
	return b.String()
}

// nginxStreamConf is nginx's stream proxy with one worker per CPU, no
// access log (the stream module logs none unless told to) and its default
// buffers; proxy_timeout is raised so held idle connections stay open.
func nginxStreamConf(dir string) string {
	var b strings.Builder
	fmt.Fprintf(&b, `%s
worker_processes auto;
worker_rlimit_nofile 16384;
daemon off;
pid %[2]s/nginx-stream.pid;
error_log %[2]s/nginx-stream.error.log error;
events { worker_connections 8192; }
stream {
`, streamLoadModule(), dir)
	for _, s := range []struct{ port, dest int }{{nWeb, webPort}, {nIperf, iperfPort}, {nHold, holdPort}} {
		fmt.Fprintf(&b, "    server { listen 127.0.0.1:%d; proxy_pass %s:%d; proxy_timeout 1h; }\n", s.port, beClientAddr, s.dest)
	}
	b.WriteString("}\n")
	return b.String()
}
