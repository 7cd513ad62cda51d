#!/usr/bin/env bash
# setup.sh prepares a Debian 12 machine for qmigrate's integration tests.
#
# It is idempotent and cheap when the cache is warm (no apt calls at all then).
# What it provides:
#   - QEMU 7.2 from Debian 12 (installed with apt when qemu-system-x86_64 or qemu-img is missing)
#   - QEMU 10.0 from bookworm-backports, unpacked (dpkg -x) into $CACHE/qemu-10.0, NOT installed
#   - Debian's cloud kernel (vmlinuz + the virtio modules the Linux guest needs) in $CACHE/kernel
#   - gcc/binutils (boot-sector guest) and iproute2 (two-host network)
#   - etcd (Debian's etcd-server) for fleet/etcdlimit's tests
#   - the Go modules of this repository and of fleet/etcdlimit (go mod download)
# and writes these env files (KEY=VALUE lines, no quoting, safe to `source` or parse):
#   $CACHE/qemu-7.2.env   $CACHE/qemu-10.0.env   QMIGRATE_QEMU, QMIGRATE_QEMU_FIRMWARE, QMIGRATE_QEMU_IMG
#   $CACHE/kernel.env                            QMIGRATE_KERNEL, QMIGRATE_KMOD_DIR
#
# Environment:
#   QMIGRATE_CACHE     cache folder (default $HOME/.cache/qmigrate); survives fresh clones
#   QMIGRATE_REFRESH=1 re-resolve and re-download QEMU 10.0 and the kernel even if cached
#   QMIGRATE_DRY_RUN=1 print the commands that would change the system instead of running them
#
# Must run as root (apt-get) unless everything is already present.
set -euo pipefail

CACHE="${QMIGRATE_CACHE:-$HOME/.cache/qmigrate}"
REFRESH="${QMIGRATE_REFRESH:-0}"
DRY="${QMIGRATE_DRY_RUN:-0}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BACKPORTS_LINE="deb http://deb.debian.org/debian bookworm-backports main"
BACKPORTS_FILE=/etc/apt/sources.list.d/bookworm-backports.list
# Kernel modules the Linux guest loads (dependencies first; checked again by the Go side).
KMODS=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk)

START=$(date +%s%N)
log() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }
# run executes a command that changes the system, or prints it in dry-run mode.
run() {
	if [[ "$DRY" == 1 ]]; then
		printf 'setup: [dry-run] %s\n' "$*" >&2
		return 0
	fi
	"$@"
}
have() { command -v "$1" >/dev/null 2>&1; }

export DEBIAN_FRONTEND=noninteractive
APT_UPDATED=0
apt_update() {
	if [[ "$APT_UPDATED" == 0 ]]; then
		log "apt-get update"
		run apt-get update -qq
		APT_UPDATED=1
	fi
}
# apt_install installs packages when at least one probe command is missing.
# usage: apt_install "cmd1 cmd2" pkg...
apt_install() {
	local probes="$1" missing=0 c
	shift
	for c in $probes; do
		have "$c" || missing=1
	done
	[[ "$missing" == 0 ]] && return 0
	apt_update
	log "apt-get install $*"
	run apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
# apt_dl downloads .deb files into a folder (as root, without the _apt sandbox warning).
# usage: apt_dl DIR pkg...
apt_dl() {
	local dir="$1"
	shift
	if [[ "$DRY" == 1 ]]; then
		log "[dry-run] (cd $dir && apt-get download $*)"
		return 0
	fi
	mkdir -p "$dir"
	(cd "$dir" && apt-get -qq -o APT::Sandbox::User=root download "$@" >/dev/null)
}

mkdir -p "$CACHE"

# ---------------------------------------------------------------- host tools
apt_install "qemu-system-x86_64 qemu-img" qemu-system-x86 qemu-utils
apt_install "gcc as ld objcopy" gcc binutils libc6-dev
apt_install "ip tc" iproute2
apt_install "xz" xz-utils
# etcd for fleet/etcdlimit's tests (each test starts its own server on loopback;
# the package's service is not needed).
apt_install "etcd" etcd-server

# ---------------------------------------------------------------- QEMU 7.2 (installed)
write_env() { # file, then KEY=VALUE lines
	local f="$1" tmp
	shift
	tmp="$(mktemp "$f.XXXXXX")"
	printf '%s\n' "$@" >"$tmp"
	mv -f "$tmp" "$f"
}
QEMU72="$(command -v qemu-system-x86_64 || echo /usr/bin/qemu-system-x86_64)"
IMG72="$(command -v qemu-img || echo /usr/bin/qemu-img)"
if [[ "$DRY" != 1 ]]; then
	write_env "$CACHE/qemu-7.2.env" "QMIGRATE_QEMU=$QEMU72" "QMIGRATE_QEMU_FIRMWARE=" "QMIGRATE_QEMU_IMG=$IMG72"
fi

# ---------------------------------------------------------------- QEMU 10.0 (unpacked)
Q10="$CACHE/qemu-10.0"
q10_ok() {
	[[ -f "$Q10/.stamp" && -x "$Q10/usr/bin/qemu-system-x86_64" && -x "$Q10/usr/bin/qemu-img" ]]
}
if [[ "$REFRESH" == 1 ]] || ! q10_ok; then
	if ! grep -rqs '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
		log "adding $BACKPORTS_LINE to $BACKPORTS_FILE"
		if [[ "$DRY" == 1 ]]; then
			log "[dry-run] echo '$BACKPORTS_LINE' > $BACKPORTS_FILE"
		else
			echo "$BACKPORTS_LINE" >"$BACKPORTS_FILE"
		fi
		APT_UPDATED=0
	fi
	# (No early-exiting readers on pipes below: with pipefail a SIGPIPE'd writer fails the script.)
	if [[ "$(apt-cache madison qemu-system-x86 2>/dev/null || true)" != *bookworm-backports* ]]; then
		APT_UPDATED=0
	fi
	apt_update
	VER10="$(apt-cache madison qemu-system-x86 | awk -F'|' '$3 ~ /bookworm-backports/ && v == "" {gsub(/ /,"",$2); v = $2} END {print v}')"
	[[ -n "$VER10" || "$DRY" == 1 ]] || die "no qemu-system-x86 in bookworm-backports (apt-cache madison qemu-system-x86)"
	[[ "$VER10" == *:10.0.* || "$DRY" == 1 ]] || die "bookworm-backports has qemu $VER10, expected 10.0.x"
	log "unpacking QEMU $VER10 into $Q10"
	DL="$CACHE/debs/qemu-10.0"
	apt_dl "$DL" "qemu-system-x86=$VER10" "qemu-system-data=$VER10" "qemu-system-common=$VER10" "qemu-utils=$VER10"
	if [[ "$DRY" != 1 ]]; then
		rm -rf "$Q10.tmp"
		mkdir -p "$Q10.tmp"
		for deb in "$DL"/*.deb; do dpkg -x "$deb" "$Q10.tmp"; done
		rm -rf "$Q10"
		mv "$Q10.tmp" "$Q10"
		echo "$VER10" >"$Q10/.stamp"
		rm -rf "$DL"
	fi
fi
if [[ "$DRY" != 1 ]]; then
	# Shared libraries: 10.0 links against the same Debian 12 libraries that 7.2's install pulled in.
	if missing="$(ldd "$Q10/usr/bin/qemu-system-x86_64" "$Q10/usr/bin/qemu-img" | grep 'not found')"; then
		die "QEMU 10.0 needs libraries that are not installed:
$missing"
	fi
	# One -L folder is enough: the Debian build's own firmware path already has /usr/share/seabios and
	# /usr/lib/ipxe/qemu after it (see: qemu-system-x86_64 -L help).
	write_env "$CACHE/qemu-10.0.env" "QMIGRATE_QEMU=$Q10/usr/bin/qemu-system-x86_64" \
		"QMIGRATE_QEMU_FIRMWARE=$Q10/usr/share/qemu" "QMIGRATE_QEMU_IMG=$Q10/usr/bin/qemu-img"
fi

# ---------------------------------------------------------------- guest kernel
KDIR="$CACHE/kernel"
kernel_ok() {
	local k m
	[[ -f "$CACHE/kernel.env" ]] || return 1
	k="$(sed -n 's/^QMIGRATE_KERNEL=//p' "$CACHE/kernel.env")"
	m="$(sed -n 's/^QMIGRATE_KMOD_DIR=//p' "$CACHE/kernel.env")"
	[[ -f "$k" && -d "$m" ]] || return 1
	for mod in "${KMODS[@]}"; do [[ -f "$m/$mod.ko" ]] || return 1; done
}
if [[ "$REFRESH" == 1 ]] || ! kernel_ok; then
	apt_update
	KPKG="$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ && p == "" {p = $2} END {print p}')"
	[[ -n "$KPKG" || "$DRY" == 1 ]] || die "cannot resolve the cloud kernel from 'apt-cache depends linux-image-cloud-amd64'"
	KVER="${KPKG#linux-image-}"
	log "fetching $KPKG"
	DL="$CACHE/debs/$KPKG"
	apt_dl "$DL" "$KPKG"
	if [[ "$DRY" != 1 ]]; then
		X="$DL/x"
		rm -rf "$X"
		mkdir -p "$X"
		dpkg -x "$DL"/*.deb "$X"
		DEST="$KDIR/$KVER"
		rm -rf "$DEST"
		mkdir -p "$DEST/modules"
		cp "$X/boot/vmlinuz-$KVER" "$DEST/vmlinuz"
		for mod in "${KMODS[@]}"; do
			f="$(find "$X/lib/modules/$KVER" \( -name "$mod.ko" -o -name "$mod.ko.xz" -o -name "$mod.ko.zst" \) -print -quit)"
			[[ -n "$f" ]] || die "module $mod not found in $KPKG"
			case "$f" in
			*.ko.xz) xz -dc "$f" >"$DEST/modules/$mod.ko" ;;
			*.ko.zst) zstd -qdc "$f" >"$DEST/modules/$mod.ko" ;;
			*) cp "$f" "$DEST/modules/$mod.ko" ;;
			esac
		done
		rm -rf "$DL"
		write_env "$CACHE/kernel.env" "QMIGRATE_KERNEL=$DEST/vmlinuz" "QMIGRATE_KMOD_DIR=$DEST/modules" \
			"QMIGRATE_KERNEL_VERSION=$KVER"
	fi
fi
rmdir "$CACHE/debs" 2>/dev/null || true

# ---------------------------------------------------------------- Go modules
if have go; then
	GO=go
elif [[ -x /usr/local/go/bin/go ]]; then
	GO=/usr/local/go/bin/go
else
	die "go is not on PATH"
fi
(cd "$REPO" && run "$GO" mod download)
(cd "$REPO/fleet/etcdlimit" && run "$GO" mod download)

END=$(date +%s%N)
if [[ "$DRY" != 1 ]]; then
	log "ready in $(awk -v a="$START" -v b="$END" 'BEGIN{printf "%.1f", (b-a)/1e9}')s: QEMU $("$QEMU72" --version | head -n1 | awk '{print $4}') + $(cat "$Q10/.stamp"), kernel $(sed -n 's/^QMIGRATE_KERNEL_VERSION=//p' "$CACHE/kernel.env"); env files in $CACHE"
fi
