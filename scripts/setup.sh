#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks for connectable, as root and
# idempotently: when everything is there it changes nothing and fetches
# nothing. `make test`, `make run` and .ci/run call it; nothing else installs.
#
#   scripts/setup.sh test   everything the whole test suite needs, then the
#                           pinned Consul build (make consul, cached in
#                           /var/cache/connectable; about 6 minutes cold)
#   scripts/setup.sh run    only what the daemon itself needs (iptables)
#
# Without root it installs nothing, says in one line which tests cannot run
# and why, and exits 0, so that `make test` goes on with the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-test}

# Each entry is CHECK:PACKAGE. CHECK is a command that the package provides
# (docker and docker-compose are checked by command because they may come
# from Docker's own packages rather than Debian's), or "pkg" for a package
# that must be installed by exactly that name: busybox-static, because the
# test images copy the host's busybox and only the static build runs there.
run_needs=(iptables:iptables ip6tables:iptables iptables-nft:iptables iptables-legacy:iptables)
test_needs=("${run_needs[@]}"
	pkg:dnsmasq-base pkg:busybox-static
	ip:iproute2 ss:iproute2 nsenter:util-linux unshare:util-linux flock:util-linux
	strace:strace timeout:coreutils nft:nftables
	docker:docker.io docker-compose:docker-compose
	podman:podman
	clang:clang llvm-strip:llvm pkg:libbpf-dev)

case $mode in
test) needs=("${test_needs[@]}") ;;
run) needs=("${run_needs[@]}") ;;
*) echo "usage: $0 test|run" >&2; exit 2 ;;
esac

if [ "$(id -u)" != 0 ]; then
	if [ "$mode" = test ]; then
		# The packages whose tests ask testenv for root, namespaces, Docker or
		# helper programs: those tests skip, the rest run.
		pkgs=$(grep -lE 'testenv\.(Need[A-Z]|NewNetNS|BusyboxImage|Dnsmasq)|prerequisites\(t\)' \
			$(git ls-files '*_test.go' 2>/dev/null || find . -name '*_test.go') 2>/dev/null |
			xargs -r -n1 dirname | sort -u | sed 's|^\.$|./|; s|^\([^.]\)|./\1|' | paste -sd' ' -)
		echo "setup: not root (uid $(id -u)), so nothing is installed and the tests that need root skip" \
			"(network namespaces, iptables, Docker, dnsmasq, Consul) in: ${pkgs:-none}; run make test as root for all of them"
	else
		echo "setup: not root (uid $(id -u)): nothing installed; the daemon itself needs root"
	fi
	exit 0
fi

installed() { [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]; }
missing=()
for entry in "${needs[@]}"; do
	check=${entry%%:*} pkg=${entry#*:}
	if [ "$check" = pkg ]; then
		installed "$pkg" && continue
	else
		command -v "$check" >/dev/null 2>&1 && continue
	fi
	case " ${missing[*]-} " in *" $pkg "*) ;; *) missing+=("$pkg") ;; esac
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "setup: installing ${missing[*]}"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [ "$mode" = test ]; then
	if ! docker version --format '{{.Server.Version}}' >/dev/null 2>&1; then
		echo "setup: warning: no Docker Engine answers (docker version fails); the Docker tests will fail until dockerd runs" >&2
	fi
	# make consul is a no-op when the cached build exists.
	make -s --no-print-directory consul GO="${GO:-go}"
fi
