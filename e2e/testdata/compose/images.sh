#!/usr/bin/env bash
# Builds the local images that docker-compose.yml beside this script runs,
# without a registry: each is a root file system made from this host's files,
# piped into `docker import`.
#
#   connectable-example/consul:1.22.7  the Consul that `make consul` builds
#                                      (CONNECTABLE_CONSUL overrides), with the
#                                      C libraries it is linked against
#   connectable-example/register:local internal/cmd/register, built static
#   connectable-example/busybox:local  Debian's static busybox and its applets
#
# The Consul and busybox images are kept once built (delete them to rebuild);
# register is rebuilt every time, from the source of this checkout.
# connectable:local itself comes from `make local-image`.
#
#   e2e/testdata/compose/images.sh [consul] [register] [busybox]   (default: all three)
#
# It runs from anywhere and needs Docker, plus Go for register and
# busybox-static for busybox.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../../.." && pwd)
consul=${CONNECTABLE_CONSUL:-/var/cache/connectable/consul-1.22.7}
go=${GO:-go}
want=" ${*:-consul register busybox} "
for w in $want; do
	case $w in consul | register | busybox) ;; *) echo "images: unknown image $w (consul, register, busybox)" >&2; exit 2 ;; esac
done
wanted() { [[ $want == *" $1 "* ]]; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# import ROOT TAG [--change ...]: ROOT's contents become image TAG. The image
# that had the tag before is removed, so rebuilding leaves nothing dangling.
import() {
	local root=$1 tag=$2 old new
	shift 2
	old=$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)
	new=$(tar -C "$root" -c . | docker import "$@" - "$tag")
	if [ -n "$old" ] && [ "$old" != "$new" ]; then docker rmi "$old" >/dev/null 2>&1 || true; fi
	echo "$tag"
}

# skeleton ROOT: the directories and files every image here needs.
skeleton() {
	mkdir -p "$1"/{bin,etc,tmp,proc,sys,dev,root,var/run}
	chmod 1777 "$1/tmp"
	printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$1/etc/passwd"
	printf 'root:x:0:\nnogroup:x:65534:\n' >"$1/etc/group"
	echo 'hosts: files dns' >"$1/etc/nsswitch.conf"
}

have() { docker image inspect "$1" >/dev/null 2>&1; }

tag=connectable-example/consul:1.22.7
if wanted consul && ! have "$tag"; then
	[ -x "$consul" ] || { echo "images: no Consul at $consul; run make consul first" >&2; exit 1; }
	root=$work/consul
	skeleton "$root"
	cp "$consul" "$root/bin/consul"
	# The build is linked against the C library when cgo is on (it is here);
	# copy whatever it needs to the same paths, following Debian's merged /usr.
	for d in lib lib64; do
		if [ -L "/$d" ]; then ln -s "$(readlink "/$d")" "$root/$d"; fi
	done
	for lib in $(ldd "$consul" 2>/dev/null | awk '/=>/ {print $3} /ld-linux/ {print $1}' | sort -u); do
		dest=$root$(readlink -f "$(dirname "$lib")")/$(basename "$lib")
		mkdir -p "$(dirname "$dest")"
		cp -L "$lib" "$dest"
	done
	import "$root" "$tag" --change 'ENTRYPOINT ["/bin/consul"]' --change 'CMD ["agent", "-dev"]'
fi

if wanted register; then
	root=$work/register
	skeleton "$root"
	(cd "$repo" && CGO_ENABLED=0 "$go" build -trimpath -o "$root/bin/register" ./internal/cmd/register)
	import "$root" connectable-example/register:local --change 'ENTRYPOINT ["/bin/register"]'
fi

tag=connectable-example/busybox:local
if wanted busybox && ! have "$tag"; then
	bb=$(command -v busybox) || { echo "images: busybox missing (apt-get install busybox-static)" >&2; exit 1; }
	root=$work/busybox
	skeleton "$root"
	cp "$bb" "$root/bin/busybox"
	for applet in $("$bb" --list); do
		[ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
	done
	import "$root" "$tag" --change 'ENV PATH=/bin' --change 'CMD ["/bin/sh"]'
fi
