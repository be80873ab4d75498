#!/usr/bin/env bash
# Builds a runnable connectable image without pulling anything: a root file
# system holding the static binary plus this host's iptables (both the nft
# and the legacy backend, with their libraries and extensions), piped into
# `docker import`. The Dockerfile builds the same from Debian base images
# where a registry is reachable; this is the path for air-gapped engines and
# for the end-to-end tests.
#
#   scripts/local-image.sh [TAG] [BINARY]    (defaults: connectable:local, bin/connectable)
set -euo pipefail
tag=${1:-connectable:local}
bin=${2:-bin/connectable}
[ -x "$bin" ] || { echo "local-image: $bin missing; run make build first" >&2; exit 1; }

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{usr/sbin,etc,run,tmp,proc,sys,dev}
cp "$bin" "$root/connectable"

multis=(/usr/sbin/xtables-nft-multi /usr/sbin/xtables-legacy-multi)
cp "${multis[@]}" "$root/usr/sbin/"
for fam in iptables ip6tables; do
	for backend in nft legacy; do
		for suffix in "" -save -restore; do
			ln -s "xtables-$backend-multi" "$root/usr/sbin/$fam-$backend$suffix"
		done
	done
done
# Debian merges /usr: /lib and /lib64 are links into /usr, and iptables
# looks for its extensions under the real path. Mirror those links, then copy
# each shared library and the extension modules to their real paths.
for d in lib lib64 bin sbin; do
	if [ -L "/$d" ]; then ln -s "$(readlink "/$d")" "$root/$d"; fi
done
real() { readlink -f "$1"; }
for lib in $(ldd "${multis[@]}" | awk '/=>/ {print $3} /ld-linux/ {print $1}' | sort -u); do
	for path in "$lib" "$(real "$lib")"; do
		dest="$root$(real "$(dirname "$path")")/$(basename "$path")"
		mkdir -p "$(dirname "$dest")"
		[ -e "$dest" ] || cp -L "$path" "$dest"
	done
done
ext=$(real "$(dirname "$(ldd /usr/sbin/xtables-nft-multi | awk '/libxtables/ {print $3}')")")/xtables
mkdir -p "$root$ext"
cp -a "$ext"/. "$root$ext"/
cp /etc/protocols /etc/services "$root/etc/" 2>/dev/null || true
echo 'hosts: files dns' > "$root/etc/nsswitch.conf"

tar -C "$root" -c . | docker import \
	--change 'ENTRYPOINT ["/connectable"]' \
	--change 'ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin' \
	- "$tag" >/dev/null
echo "$tag"
