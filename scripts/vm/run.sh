#!/usr/bin/env bash
# scripts/vm/run.sh - ferry's VM test tier: Go test binaries inside a Debian 12
# kernel (6.1: soft-dirty page tracking, a full cgroup v2) booted with qemu in
# software emulation (TCG). The machines ferry is developed on run cgroup v1
# and lack soft-dirty; this tier is where pre-copy and cgroup v2 are tested.
#
# Usage: scripts/vm/run.sh [options]
#   --bin DIR         ferryd and ferryctl to put in the VM (default: built
#                     from this checkout into the work dir)
#   --test-pkg PKG    Go package to build with `go test -c` and run inside
#                     (repeatable, e.g. ./integration)
#   --test-bin PATH   prebuilt Go test binary to run inside (repeatable)
#   --run REGEX       -test.run for the --test-pkg/--test-bin just before it
#                     (default: every test of that binary)
#   --bench REGEX     -test.bench (with -test.benchtime 1x) for the
#                     --test-pkg/--test-bin just before it; give --run '^$'
#                     to run only benchmarks (FERRY_VM_BENCH_MIB in the
#                     environment passes through to the guest)
#   --timeout SEC     wall-clock limit for the whole VM, boot to power-off
#                     (default 900); qemu is killed when it is reached
#   --mem MIB         guest memory (default 2048)
#   --smp N           guest CPUs (default 4, on 2 host cores too: see SMP below)
#   --cache DIR       kernel cache (default $FERRY_VM_CACHE or /var/cache/ferry-vm)
#   --kernel-pkg NAME Debian package to take the kernel from (default: what
#                     Debian 12's linux-image-amd64 depends on, linux-image-6.1.0-N-amd64)
#   --kernel FILE     boot this bzImage instead of the package's (the modules
#                     still come from the package; for debugging the tier)
#   --append ARGS     add to the kernel command line (later arguments win);
#                     "ferry.loglevel=8" lets every kernel message through
#                     to the console during the tests (default: alerts only)
#   --allow-skip      do not fail when a top-level test skips
#   --keep            keep the work dir (initramfs, serial log) and say where
#   -h, --help
#
# Without --test-pkg/--test-bin it runs the default selection:
#   --test-pkg ./integration/vmtest   (all of it: soft-dirty, cgroup v2, CRIU
#                                     pre-dump rounds, the tools CRIU runs, ferryd on v2)
#   --test-pkg ./integration --run '^(TestContainerDefaults|TestStopHonoursSIGTERM|TestVMMigratePreCopy|
#                                     TestVMMigratePreCopyFaults|TestElasticHardenAndRelax|
#                                     TestSysctlGuardDeniesGlobalWrites)$'
#
# Inside, every binary runs as root with CI=true (a missing prerequisite
# fails), FERRY_VM=1 (the vmtest package runs only then) and
# FERRY_BIN=/ferry/bin. The go test -v output comes back over the serial
# console, streamed here and kept in the serial log.
#
# Exit status: 0 only if every binary exited 0, each ran at least one test
# and none skipped at the top level; 2 for a usage error; 1 otherwise - a
# test failed, the VM did not boot or did not report, the timeout struck, a
# setup step inside failed (a kernel module, a mount). Interrupted, it kills
# qemu and removes its work dir like at any other exit.
#
# Needs what make deps installs (qemu-system-x86, cpio, kmod, busybox-static,
# iptables, iproute2, /opt/ferry/criu, the busybox rootfs), apt with Debian
# 12 sources (the kernel .deb is fetched once per version into the cache),
# and go unless everything is prebuilt.
set -euo pipefail

REPO=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.." && pwd)
GUEST_INIT=$REPO/scripts/vm/guest-init.sh

FERRY_PREFIX=${FERRY_PREFIX:-/opt/ferry}
CRIU_PREFIX=$FERRY_PREFIX/criu
CRIU_WRAPPER=$FERRY_PREFIX/bin/criu
ROOTFS=$FERRY_PREFIX/rootfs/busybox

DEFAULT_INTEGRATION_RUN='^(TestContainerDefaults|TestStopHonoursSIGTERM|TestVMMigratePreCopy|TestVMMigratePreCopyFaults|TestElasticHardenAndRelax|TestSysctlGuardDeniesGlobalWrites)$'

# Modules loaded at boot, by name (dependencies and soft dependencies are
# resolved on the host with modprobe --show-depends; libcrc32c's crc32c
# comes first that way). CRIU: the *_diag sockets, tun, netfilter for the
# network lock (iptables-nft and CRIU's nftables lock), ctnetlink (every
# netns dump reads the conntrack table: without it, "-22 reported by
# netlink"). ferry: veth, bridge, overlay. The kernel's own module requests
# work too (busybox modprobe reads modules.alias), for modules in the image.
BOOT_MODULES=(inet_diag tcp_diag udp_diag raw_diag unix_diag netlink_diag af_packet_diag
	tun nfnetlink nf_tables nft_compat nft_ct nft_nat nft_masq nft_chain_nat nft_reject_inet
	nf_conntrack nf_conntrack_netlink nf_nat x_tables xt_mark xt_conntrack xt_tcpudp xt_addrtype xt_comment
	xt_MASQUERADE ip_tables iptable_filter iptable_nat ip6_tables ip6table_filter
	veth bridge overlay)
# In the initramfs and loadable (modprobe, or the kernel's own request), not
# loaded at boot: br_netfilter changes how bridged traffic is filtered.
EXTRA_MODULES=(br_netfilter xt_multiport xt_state xt_REDIRECT xt_nat xt_owner xt_physdev
	xt_set ip_set nft_fib_inet nft_limit nft_log ip6table_nat)

# Host tools copied with their libraries (real versions win over busybox's).
# CRIU runs ip (iproute2: route and rule save/restore), GNU tar and gzip
# (tmpfs contents, with options busybox's tar lacks) and iptables.
# /bin/sh is dash, as on the host: busybox-static's sh runs its own applets
# before PATH (its "ip" for iproute2's, its "tar" for GNU tar).
HOST_TOOLS=(/usr/bin/dash /usr/bin/ip /usr/bin/tar /usr/bin/gzip /usr/bin/nsenter /usr/bin/unshare)
IPTABLES_NAMES=(iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore
	iptables-nft iptables-nft-save iptables-nft-restore ip6tables-nft ip6tables-nft-save ip6tables-nft-restore)
IPTABLES_LEGACY_NAMES=(iptables-legacy iptables-legacy-save iptables-legacy-restore
	ip6tables-legacy ip6tables-legacy-save ip6tables-legacy-restore)

BIN_DIR=""
TESTS_KIND=()   # pkg | bin
TESTS_SRC=()
TESTS_RUN=()
TESTS_BENCH=()
TESTS_PKGDIR=() # source dir of a --test-pkg (its testdata goes along), else empty
TIMEOUT=900
MEM=2048
# Four vCPUs although CI machines have two cores: with two, the emulated
# CPUs' PSI crosses ferryd's CPU hardening threshold (40% "some" stall) and
# best-effort containers get clamped to nothing (measured over the whole
# integration suite: 35 hardenings with -smp 2, one with -smp 4).
SMP=4
CACHE=${FERRY_VM_CACHE:-/var/cache/ferry-vm}
KERNEL_PKG=""
KERNEL_FILE=""
EXTRA_APPEND=""
ALLOW_SKIP=0
KEEP=0

WORK=""
QEMU_PID=""

say()  { printf 'vm: %s\n' "$*"; }
warn() { printf 'vm: WARNING: %s\n' "$*" >&2; }
die()  { printf 'vm: ERROR: %s\n' "$*" >&2; exit 1; }
usage_error() { printf 'vm: %s (see --help)\n' "$*" >&2; exit 2; }

# shellcheck disable=SC2317 # run by the EXIT trap
cleanup() {
	local rc=$?
	if (( rc == 130 || rc == 143 )); then
		printf 'vm: interrupted (exit %d): stopping qemu and removing the work dir\n' "$rc" >&2
	fi
	if [[ -n $QEMU_PID ]] && kill -0 "$QEMU_PID" 2>/dev/null; then
		kill -TERM "$QEMU_PID" 2>/dev/null || true
		for _ in $(seq 1 20); do
			kill -0 "$QEMU_PID" 2>/dev/null || break
			sleep 0.25
		done
		kill -KILL "$QEMU_PID" 2>/dev/null || true
		wait "$QEMU_PID" 2>/dev/null || true
	fi
	if [[ -n $WORK && -d $WORK ]]; then
		if (( KEEP )); then
			say "kept the work dir $WORK (serial log: $WORK/serial.log)"
		else
			rm -rf -- "$WORK"
		fi
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- arguments
parse_args() {
	local opt val
	while (( $# )); do
		opt=$1
		case $opt in
		--allow-skip) ALLOW_SKIP=1; shift; continue ;;
		--keep) KEEP=1; shift; continue ;;
		-h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
		--bin|--test-pkg|--test-bin|--run|--bench|--timeout|--mem|--smp|--cache|--kernel-pkg|--kernel|--append)
			(( $# >= 2 )) || usage_error "$opt needs a value"
			val=$2; shift 2 ;;
		*) usage_error "unknown argument '$opt'" ;;
		esac
		case $opt in
		--bin) BIN_DIR=$val ;;
		--test-pkg) TESTS_KIND+=(pkg); TESTS_SRC+=("$val"); TESTS_RUN+=(""); TESTS_BENCH+=(""); TESTS_PKGDIR+=("") ;;
		--test-bin) TESTS_KIND+=(bin); TESTS_SRC+=("$val"); TESTS_RUN+=(""); TESTS_BENCH+=(""); TESTS_PKGDIR+=("") ;;
		--bench)
			(( ${#TESTS_SRC[@]} )) || usage_error "--bench must follow the --test-pkg or --test-bin it applies to"
			TESTS_BENCH[${#TESTS_BENCH[@]}-1]=$val ;;
		--run)
			(( ${#TESTS_SRC[@]} )) || usage_error "--run must follow the --test-pkg or --test-bin it applies to"
			TESTS_RUN[${#TESTS_RUN[@]}-1]=$val ;;
		--timeout) TIMEOUT=$val ;;
		--mem) MEM=$val ;;
		--smp) SMP=$val ;;
		--cache) CACHE=$val ;;
		--kernel-pkg) KERNEL_PKG=$val ;;
		--kernel) KERNEL_FILE=$val ;;
		--append) EXTRA_APPEND=$val ;;
		esac
	done
	if ! [[ $TIMEOUT =~ ^[0-9]+$ ]] || (( TIMEOUT < 60 )); then usage_error "--timeout '$TIMEOUT': want whole seconds, at least 60"; fi
	if ! [[ $MEM =~ ^[0-9]+$ ]] || (( MEM < 512 )); then usage_error "--mem '$MEM': want MiB, at least 512"; fi
	[[ $SMP =~ ^[1-9][0-9]*$ ]] || usage_error "--smp '$SMP': want a positive integer"
	if [[ -n $BIN_DIR ]]; then
		BIN_DIR=$(cd -- "$BIN_DIR" 2>/dev/null && pwd) || usage_error "--bin: no such directory"
	fi
	if [[ -n $KERNEL_FILE ]]; then
		[[ -f $KERNEL_FILE ]] || usage_error "--kernel $KERNEL_FILE: no such file"
		KERNEL_FILE=$(realpath -- "$KERNEL_FILE")
	fi
	if (( ${#TESTS_SRC[@]} == 0 )); then
		TESTS_KIND=(pkg pkg)
		TESTS_SRC=(./integration/vmtest ./integration)
		TESTS_RUN=("" "$DEFAULT_INTEGRATION_RUN")
		TESTS_BENCH=("" "")
		TESTS_PKGDIR=("" "")
	fi
	local i
	for i in "${!TESTS_SRC[@]}"; do
		[[ -n ${TESTS_RUN[$i]} ]] || TESTS_RUN[i]=.
		if [[ ${TESTS_KIND[$i]} == bin ]]; then
			[[ -x ${TESTS_SRC[$i]} ]] || usage_error "--test-bin ${TESTS_SRC[$i]}: not an executable file"
			TESTS_SRC[i]=$(realpath -- "${TESTS_SRC[$i]}")
		fi
	done
}

preflight() {
	local t missing=()
	for t in qemu-system-x86_64 cpio depmod modprobe apt-get apt-cache dpkg-deb ldd flock; do
		command -v "$t" >/dev/null || missing+=("$t")
	done
	(( ${#missing[@]} == 0 )) || die "preflight: missing ${missing[*]} (make deps installs qemu-system-x86, cpio, kmod)"
	BUSYBOX=$(command -v busybox || true)
	# ldd fails on a static binary; busybox-static's is the one that runs as /init.
	if [[ -z $BUSYBOX ]] || ldd "$BUSYBOX" >/dev/null 2>&1; then
		die "preflight: a static busybox is needed (package busybox-static)"
	fi
	[[ -x $CRIU_PREFIX/usr/sbin/criu && -x $CRIU_WRAPPER ]] ||
		die "preflight: CRIU prefix $CRIU_PREFIX or wrapper $CRIU_WRAPPER missing (run make deps)"
	[[ -x $ROOTFS/bin/busybox ]] || die "preflight: default rootfs $ROOTFS missing (run make deps)"
	[[ -r $GUEST_INIT ]] || die "preflight: $GUEST_INIT missing"
	if [[ -z $BIN_DIR ]] || printf '%s\n' "${TESTS_KIND[@]}" | grep -qx pkg; then
		command -v go >/dev/null || die "preflight: go is needed to build the binaries (or pass --bin and --test-bin)"
	fi
}

# ------------------------------------------------------------- the kernel
# Prints "package version" of the Debian 6.1 kernel image to use.
resolve_kernel() {
	local pkg=$KERNEL_PKG ver
	if [[ -z $pkg ]]; then
		pkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
			awk '$1 == "Depends:" && $2 ~ /^linux-image-6\.1\.0-[0-9]+-amd64$/ { print $2; exit }')
	fi
	if [[ -z $pkg ]]; then
		# Not bookworm's metapackage (another release, or lists without it):
		# the newest 6.1 image the lists know.
		pkg=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' 2>/dev/null |
			awk '{ print $1 }' | sort -V | tail -n 1)
	fi
	[[ -n $pkg ]] || return 1
	ver=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ { print $2 }')
	[[ -n $ver && $ver != "(none)" ]] || return 1
	printf '%s %s\n' "$pkg" "$ver"
}

# Sets KDIR (cached, unpacked package with modules.dep), KVER (uname -r of
# it), KPKG, KPKGVER. Downloads and unpacks once per package version.
fetch_kernel() {
	mkdir -p "$CACHE/kernel" || die "kernel: cannot create the cache dir $CACHE (use --cache or FERRY_VM_CACHE)"
	exec 8>"$CACHE/.lock"
	flock -w 600 8 || die "kernel: another run holds $CACHE/.lock for over 10 minutes"

	local pv
	if ! pv=$(resolve_kernel); then
		if (( EUID == 0 )); then
			say "kernel: the package lists do not name a 6.1 kernel; apt-get update"
			timeout 900 apt-get -q -o DPkg::Lock::Timeout=300 update >"$WORK/apt-update.log" 2>&1 ||
				{ tail -n 20 "$WORK/apt-update.log" >&2; die "kernel: apt-get update failed"; }
			pv=$(resolve_kernel) || true
		fi
	fi
	if [[ -z $pv ]]; then
		local newest
		newest=$(find "$CACHE/kernel" -mindepth 2 -maxdepth 2 -name .complete -printf '%h\n' | sort -V | tail -n 1)
		[[ -n $newest ]] || die "kernel: apt knows no ${KERNEL_PKG:-linux-image-6.1.0-*-amd64} package (Debian 12 sources needed) and the cache $CACHE/kernel is empty"
		warn "kernel: apt cannot resolve the package; using the cached $(basename "$newest")"
		pv=$(basename "$newest"); pv=${pv/_/ }
	fi
	KPKG=${pv% *}; KPKGVER=${pv#* }
	KDIR=$CACHE/kernel/${KPKG}_$KPKGVER

	if [[ ! -f $KDIR/.complete ]]; then
		say "kernel: downloading $KPKG $KPKGVER with apt-get download"
		local dl=$WORK/deb
		mkdir -p "$dl"
		if (( EUID == 0 )) && id _apt >/dev/null 2>&1; then chmod 755 "$WORK"; chown _apt "$dl"; fi
		if ! (cd "$dl" && timeout 900 apt-get -q download "$KPKG=$KPKGVER") >"$WORK/apt-download.log" 2>&1; then
			(( EUID == 0 )) || { cat "$WORK/apt-download.log" >&2; die "kernel: apt-get download $KPKG=$KPKGVER failed"; }
			say "kernel: download failed; apt-get update and retry"
			timeout 900 apt-get -q -o DPkg::Lock::Timeout=300 update >"$WORK/apt-update.log" 2>&1 || true
			(cd "$dl" && timeout 900 apt-get -q download "$KPKG=$KPKGVER") >"$WORK/apt-download.log" 2>&1 ||
				{ cat "$WORK/apt-download.log" >&2; die "kernel: apt-get download $KPKG=$KPKGVER failed"; }
		fi
		local deb
		deb=$(compgen -G "$dl/${KPKG}_*.deb" | head -n 1) || true
		[[ -n $deb ]] || die "kernel: the downloaded .deb of $KPKG is not in $dl"
		rm -rf -- "$KDIR.new"
		mkdir -p "$KDIR.new"
		dpkg-deb -x "$deb" "$KDIR.new" || die "kernel: dpkg-deb -x $deb failed"
		local kv
		kv=$(find "$KDIR.new/lib/modules" -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | head -n 1)
		[[ -n $kv && -d $KDIR.new/lib/modules/$kv/kernel ]] || die "kernel: $deb holds no lib/modules/<version>/kernel"
		depmod -b "$KDIR.new" "$kv" || die "kernel: depmod -b on the unpacked $KPKG failed"
		printf '%s\n' "$kv" >"$KDIR.new/.kver"
		touch "$KDIR.new/.complete"
		rm -rf -- "$KDIR"
		mv -- "$KDIR.new" "$KDIR"
		rm -rf -- "$dl"
		# Keep only this version: the cache is an unpacked kernel (~400 MB).
		find "$CACHE/kernel" -mindepth 1 -maxdepth 1 -type d ! -name "$(basename "$KDIR")" -exec rm -rf -- {} +
	fi
	KVER=$(<"$KDIR/.kver")
	KIMAGE=$KDIR/boot/vmlinuz-$KVER
	KCONFIG=$KDIR/boot/config-$KVER
	[[ -f $KIMAGE && -f $KCONFIG ]] || die "kernel: $KDIR lacks boot/vmlinuz-$KVER or boot/config-$KVER (delete it to refetch)"
	flock -u 8

	local c ok=1
	for c in CONFIG_MEM_SOFT_DIRTY=y CONFIG_CGROUP_BPF=y CONFIG_MEMCG=y CONFIG_CHECKPOINT_RESTORE=y CONFIG_BLK_DEV_INITRD=y CONFIG_SERIAL_8250_CONSOLE=y; do
		grep -qx "$c" "$KCONFIG" || { warn "kernel: $KCONFIG lacks $c"; ok=0; }
	done
	(( ok )) || die "kernel: $KPKG $KPKGVER lacks a config option the tier needs (above)"
	say "kernel: $KPKG $KPKGVER ($KVER), $(grep -x 'CONFIG_MEM_SOFT_DIRTY=y' "$KCONFIG") in boot/config-$KVER (cache $KDIR)"
	if [[ -n $KERNEL_FILE ]]; then
		warn "kernel: booting $KERNEL_FILE instead of the package's vmlinuz (--kernel)"
		KIMAGE=$KERNEL_FILE
	fi
}

# ---------------------------------------------------------- the binaries
build_binaries() {
	if [[ -z $BIN_DIR ]]; then
		BIN_DIR=$WORK/bin
		mkdir -p "$BIN_DIR"
		say "build: ferryd and ferryctl from $REPO"
		local c
		for c in ferryd ferryctl; do
			(cd "$REPO" && go build -o "$BIN_DIR/$c" "./cmd/$c") || die "build: go build ./cmd/$c failed"
		done
	fi
	[[ -x $BIN_DIR/ferryd && -x $BIN_DIR/ferryctl ]] || die "build: $BIN_DIR lacks ferryd or ferryctl"
	local i name
	mkdir -p "$WORK/tests"
	for i in "${!TESTS_SRC[@]}"; do
		if [[ ${TESTS_KIND[$i]} == pkg ]]; then
			name=$(basename -- "${TESTS_SRC[$i]}")
			say "build: go test -c ${TESTS_SRC[$i]}"
			mkdir -p "$WORK/tests/$i"
			(cd "$REPO" && go test -c -o "$WORK/tests/$i/$name.test" "${TESTS_SRC[$i]}") ||
				die "build: go test -c ${TESTS_SRC[$i]} failed"
			[[ -x $WORK/tests/$i/$name.test ]] || die "build: ${TESTS_SRC[$i]} has no tests (go test -c wrote nothing)"
			TESTS_PKGDIR[i]=$(cd "$REPO" && go list -f '{{.Dir}}' "${TESTS_SRC[$i]}")
			TESTS_SRC[i]=$WORK/tests/$i/$name.test
		fi
	done
}

# ---------------------------------------------------------- the initramfs
# copy_elf SRC DEST: copies a program to DEST in the tree with every library
# ldd resolves for it (at the same paths; the tree is /usr-merged like the
# host).
copy_elf() {
	local src=$1 dest=$2 lib
	mkdir -p "$TREE/$(dirname "$dest")"
	cp -L -- "$src" "$TREE/$dest"
	while read -r lib; do
		[[ -e $TREE$lib ]] && continue
		mkdir -p "$TREE$(dirname "$lib")"
		cp -L -- "$lib" "$TREE$lib"
	done < <(ldd "$src" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
}

add_modules() {
	local base=$KDIR/lib/modules/$KVER dest=$TREE/lib/modules/$KVER m line path
	mkdir -p "$dest" "$TREE/etc/ferry-vm"
	: >"$TREE/etc/ferry-vm/modules.boot"
	local -A have=()
	for m in "${BOOT_MODULES[@]}" "${EXTRA_MODULES[@]}"; do
		local deps
		deps=$(modprobe -d "$KDIR" -S "$KVER" --show-depends "$m" 2>&1) ||
			die "modules: $m is not a module of $KVER: $deps"
		while read -r line; do
			case $line in
			"builtin "*) continue ;;
			"insmod "*) path=${line#insmod }; path=${path%% *} ;;
			*) die "modules: unexpected modprobe --show-depends line for $m: $line" ;;
			esac
			[[ -n ${have[$path]:-} ]] && continue
			have[$path]=1
			mkdir -p "$dest/$(dirname "${path#"$base"/}")"
			cp -- "$path" "$dest/${path#"$base"/}"
		done <<<"$deps"
	done
	# Boot order: each module after what --show-depends put before it, so
	# soft dependencies busybox's modprobe does not know come first.
	for m in "${BOOT_MODULES[@]}"; do
		modprobe -d "$KDIR" -S "$KVER" --show-depends "$m" |
			awk '$1 == "insmod" { n = split($2, p, "/"); sub(/\.ko(\.[a-z]+)?$/, "", p[n]); print p[n] }'
	done | awk '!seen[$0]++' >"$TREE/etc/ferry-vm/modules.boot"
	cp -- "$base"/modules.order "$base"/modules.builtin "$base"/modules.builtin.modinfo "$dest/"
	depmod -b "$TREE" "$KVER" || die "modules: depmod -b on the initramfs tree failed"
	say "initramfs: ${#have[@]} kernel modules ($(wc -l <"$TREE/etc/ferry-vm/modules.boot") loaded at boot)"
}

add_busybox_applets() {
	local applet name
	while read -r applet; do
		name=${applet##*/}
		[[ -z $name || $name == busybox || $name == init || $name == linuxrc ]] && continue
		[[ -e $TREE/usr/bin/$name || -e $TREE/usr/sbin/$name || -L $TREE/usr/bin/$name || -L $TREE/usr/sbin/$name ]] && continue
		case $applet in
		sbin/*|usr/sbin/*) ln -s ../bin/busybox "$TREE/usr/sbin/$name" ;;
		*) ln -s busybox "$TREE/usr/bin/$name" ;;
		esac
	done < <("$BUSYBOX" --list-full)
}

build_initramfs() {
	TREE=$WORK/tree
	local d
	mkdir -p "$TREE"/{usr/bin,usr/sbin,usr/lib,usr/lib64,usr/local/sbin,usr/local/bin,etc,proc,sys,dev,tmp,run,root,var,opt,ferry/bin,ferry/tests}
	for d in bin sbin lib lib64; do
		ln -s "usr/$d" "$TREE/$d"
	done
	ln -s ../run "$TREE/var/run"
	chmod 1777 "$TREE/tmp"
	chmod 700 "$TREE/root"

	cp -- "$BUSYBOX" "$TREE/usr/bin/busybox"
	cp -- "$GUEST_INIT" "$TREE/init"
	chmod 755 "$TREE/init"
	sed -i '1s|.*|#!/bin/busybox sh|' "$TREE/init"

	# ferry, the tests, host tools, iptables (nft and legacy) with its plugins.
	copy_elf "$BIN_DIR/ferryd" /ferry/bin/ferryd
	copy_elf "$BIN_DIR/ferryctl" /ferry/bin/ferryctl
	# The benchmarks' workload, static (make build).
	if [[ -x $BIN_DIR/hog ]]; then
		install -m 0755 -- "$BIN_DIR/hog" "$TREE/ferry/bin/hog"
	fi
	local i name
	for i in "${!TESTS_SRC[@]}"; do
		name=$(printf '%02d-%s' "$((i + 1))" "$(basename -- "${TESTS_SRC[$i]}" .test)")
		mkdir -p "$TREE/ferry/tests/$name"
		copy_elf "${TESTS_SRC[$i]}" "/ferry/tests/$name/test"
		# go test runs a test binary in its package's directory; this is the
		# stand-in, with the package's testdata.
		if [[ -n ${TESTS_PKGDIR[$i]:-} && -d ${TESTS_PKGDIR[$i]}/testdata ]]; then
			cp -a -- "${TESTS_PKGDIR[$i]}/testdata" "$TREE/ferry/tests/$name/testdata"
		fi
		printf '%s\n' "${TESTS_RUN[$i]}" >"$TREE/ferry/tests/$name/run"
		if [[ -n ${TESTS_BENCH[$i]:-} ]]; then
			printf '%s\n' "${TESTS_BENCH[$i]}" >"$TREE/ferry/tests/$name/bench"
		fi
		TESTS_NAME[i]=$name
	done
	local t
	for t in "${HOST_TOOLS[@]}"; do
		[[ -x $t ]] || die "initramfs: host tool $t missing"
		copy_elf "$t" "$t"
	done
	ln -s dash "$TREE/usr/bin/sh"
	local n
	copy_elf /usr/sbin/xtables-nft-multi /usr/sbin/xtables-nft-multi
	for n in "${IPTABLES_NAMES[@]}"; do ln -s xtables-nft-multi "$TREE/usr/sbin/$n"; done
	copy_elf /usr/sbin/xtables-legacy-multi /usr/sbin/xtables-legacy-multi
	for n in "${IPTABLES_LEGACY_NAMES[@]}"; do ln -s xtables-legacy-multi "$TREE/usr/sbin/$n"; done
	local so
	mkdir -p "$TREE/usr/lib/x86_64-linux-gnu/xtables"
	for so in /usr/lib/x86_64-linux-gnu/xtables/*.so; do
		copy_elf "$so" "$so"
	done
	add_busybox_applets

	# CRIU (its own prefix and libc, run through the wrapper) and the rootfs.
	mkdir -p "$TREE$FERRY_PREFIX/bin" "$TREE$FERRY_PREFIX/rootfs"
	cp -a -- "$CRIU_PREFIX" "$TREE$CRIU_PREFIX"
	cp -a -- "$CRIU_WRAPPER" "$TREE$CRIU_WRAPPER"
	ln -s "$CRIU_WRAPPER" "$TREE/usr/local/sbin/criu"
	cp -a -- "$ROOTFS" "$TREE$ROOTFS"

	# /etc
	local f
	for f in /etc/protocols /etc/services /etc/ethertypes; do
		[[ -r $f ]] && cp -L -- "$f" "$TREE$f"
	done
	printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$TREE/etc/passwd"
	printf 'root:x:0:\ntty:x:5:\nnogroup:x:65534:\n' >"$TREE/etc/group"
	printf '127.0.0.1 localhost ferry-vm\n::1 localhost ip6-localhost\n' >"$TREE/etc/hosts"
	echo ferry-vm >"$TREE/etc/hostname"
	ln -s /proc/self/mounts "$TREE/etc/mtab"
	if command -v ldconfig >/dev/null; then ldconfig -r "$TREE" 2>/dev/null || true; fi

	add_modules

	NONCE=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
	{
		printf 'FERRY_VM_NONCE=%s\n' "$NONCE"
		printf 'FERRY_VM_BUDGET=%s\n' "$TIMEOUT"
		# A benchmark's size, passed through (digits only).
		if [[ ${FERRY_VM_BENCH_MIB:-} =~ ^[0-9]+$ ]]; then
			printf 'export FERRY_VM_BENCH_MIB=%s\n' "$FERRY_VM_BENCH_MIB"
		fi
	} >"$TREE/ferry/vm.conf"

	INITRD=$WORK/initrd.img
	(cd "$TREE" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
		cpio --null -o -H newc -R 0:0 --quiet) >"$INITRD" || die "initramfs: cpio failed"
	say "initramfs: $(du -sm "$TREE" | cut -f1) MiB in $(find "$TREE" | wc -l) files, cpio $(( $(stat -c %s "$INITRD") >> 20 )) MiB (uncompressed: TCG unpacks it faster than it decompresses)"
}

# ------------------------------------------------------------------ qemu
run_qemu() {
	LOG=$WORK/serial.log
	: >"$LOG"
	# panic=-1 and -no-reboot: a panic (also /init dying) stops the VM at
	# once. cgroup_no_v1=all: nothing can bind a controller to v1.
	# init_on_alloc=0 and mitigations=off only save emulated CPU time.
	# nokaslr: the vCPUs' instruction pointers map to System.map when a
	# hung guest is examined (qemu_cpus).
	local append="console=ttyS0 panic=-1 quiet loglevel=4 rdinit=/init cgroup_no_v1=all init_on_alloc=0 mitigations=off nokaslr 8250.nr_uarts=1${EXTRA_APPEND:+ $EXTRA_APPEND}"
	# The human monitor on a socket in the work dir (root's alone), for
	# qemu_cpus at a timeout.
	MON_SOCK=$WORK/monitor.sock
	# shellcheck disable=SC2054 # the commas belong to qemu's option syntax
	local cmd=(qemu-system-x86_64 -name ferry-vm,debug-threads=on -accel tcg,thread=multi -machine pc -cpu max -smp "$SMP" -m "$MEM"
		-kernel "$KIMAGE" -initrd "$INITRD" -append "$append"
		-nodefaults -no-user-config -display none -monitor "unix:$MON_SOCK,server=on,wait=off" -serial "file:$LOG" -nic none -no-reboot)
	say "qemu: ${cmd[*]}"
	local t0 now off=0 size init_seen="" exit_seen="" timed_out=0
	t0=$(date +%s.%N)
	"${cmd[@]}" </dev/null >"$WORK/qemu.out" 2>&1 &
	QEMU_PID=$!
	local deadline=$(( ${t0%.*} + TIMEOUT )) grace_end=""
	while kill -0 "$QEMU_PID" 2>/dev/null; do
		size=$(stat -c %s "$LOG")
		if (( size > off )); then
			tail -c "+$((off + 1))" "$LOG" | head -c "$((size - off))" | tr -d '\r'
			off=$size
			if [[ -z $init_seen ]] && grep -aq '^FERRY-VM-INIT' "$LOG"; then
				now=$(date +%s.%N); init_seen=$(awk -v a="$t0" -v b="$now" 'BEGIN{printf "%.1f", b-a}')
			fi
			if [[ -z $exit_seen ]] && grep -aq "^FERRY-VM-EXIT=.* $NONCE" "$LOG"; then
				exit_seen=1; grace_end=$(( $(date +%s) + 30 ))
			fi
		fi
		now=$(date +%s)
		if (( now >= deadline )); then
			timed_out=1
			qemu_state
			qemu_cpus
			break
		fi
		if [[ -n $grace_end ]] && (( now >= grace_end )); then
			warn "qemu: the guest reported its result but did not power off within 30 s; killing qemu"
			break
		fi
		sleep 0.5
	done
	if kill -0 "$QEMU_PID" 2>/dev/null; then
		kill -KILL "$QEMU_PID" 2>/dev/null || true
	fi
	local qrc=0
	wait "$QEMU_PID" 2>/dev/null || qrc=$?
	QEMU_PID=""
	size=$(stat -c %s "$LOG")
	(( size > off )) && tail -c "+$((off + 1))" "$LOG" | tr -d '\r'
	echo
	now=$(date +%s.%N)
	VM_SECONDS=$(awk -v a="$t0" -v b="$now" 'BEGIN{printf "%.1f", b-a}')
	BOOT_SECONDS=${init_seen:-}
	if (( timed_out )); then
		say "qemu: TIMEOUT after ${TIMEOUT}s: qemu killed"
		tail -n 50 <(tr -d '\r' <"$LOG") | sed 's/^/  | /'
		die "the VM did not finish within --timeout ${TIMEOUT}s (boot hung or tests hung); last 50 lines above"
	fi
	if [[ -s $WORK/qemu.out ]]; then
		sed 's/^/vm: qemu: /' "$WORK/qemu.out"
	fi
	(( qrc == 0 )) || warn "qemu exited with status $qrc"
}

# qemu_state tells a guest that is busy from a qemu that is stuck: the CPU
# time qemu used over two seconds and the state of each of its threads.
qemu_state() {
	local t1 t2
	t1=$(awk '{ print $14 + $15 }' "/proc/$QEMU_PID/stat" 2>/dev/null) || return 0
	sleep 2
	t2=$(awk '{ print $14 + $15 }' "/proc/$QEMU_PID/stat" 2>/dev/null) || return 0
	say "qemu: used $(( (t2 - t1) * 100 / $(getconf CLK_TCK) / 2 ))% of a CPU over the last 2 s; threads (state, name):" \
		"$(for f in /proc/"$QEMU_PID"/task/*/stat; do awk '{ sub(/.*\) /, ""); printf "%s ", $1 }' "$f"; awk -F'[()]' '{ printf "%s; ", $2 }' "$f"; done 2>/dev/null)"
}

# qemu_cpus shows where each vCPU of a guest that stopped reporting is:
# its instruction pointer, twice, a second apart. The guest boots with
# nokaslr, so the addresses map to symbols with the System.map or vmlinux
# of Debian's linux-image-<version>-dbg package (the package's own
# System.map is a placeholder).
qemu_cpus() {
	local regs=$WORK/registers.txt
	: >"$regs"
	if ! command -v socat >/dev/null; then
		warn "qemu: no socat (make deps installs it); no CPU state"
		return 0
	fi
	local round
	for round in 1 2; do
		printf 'info registers -a\n' | timeout 3 socat -t 2 - "UNIX-CONNECT:$MON_SOCK" >>"$regs" 2>/dev/null || true
		sleep 1
	done
	say "qemu: vCPU instruction pointers, two samples a second apart (map them with $KPKG-dbg):" \
		"$(grep -ao 'RIP=[0-9a-f]*' "$regs" | sed 's/RIP=//' | tr '\n' ' ')"
}

# ---------------------------------------------------------------- results
report() {
	local clean=$WORK/serial.txt
	tr -d '\r' <"$LOG" >"$clean"
	local code
	code=$(awk -v n="$NONCE" '/^FERRY-VM-EXIT=/ && $2 == n { sub(/^FERRY-VM-EXIT=/, "", $1); print $1 }' "$clean" | tail -n 1)
	if [[ -z $code ]]; then
		printf 'vm: ---- last 50 lines of the serial console ----\n'
		if [[ -s $clean ]]; then tail -n 50 "$clean" | sed 's/^/  | /'; else echo "  (empty: the kernel printed nothing)"; fi
		die "the VM did not report: boot failed or tests hung (no FERRY-VM-EXIT marker in the serial log; qemu ran ${VM_SECONDS}s)"
	fi

	info() { awk -v k="$1" '$1 == "FERRY-VM-INFO" { for (i = 2; i <= NF; i++) if (index($i, k "=") == 1) { v = substr($0, index($0, " " k "=") + length(k) + 2); if (v ~ /^"/) { sub(/^"/, "", v); sub(/".*/, "", v) } else sub(/ .*/, "", v); print v; exit } }' "$clean"; }
	local kernel cgfs ctrls subtree dirty criu_check
	kernel=$(info kernel); cgfs=$(info cgroup_fs); ctrls=$(info cgroup_controllers)
	subtree=$(info cgroup_subtree_control); dirty=$(info softdirty); criu_check=$(info criu_check)

	local fail=() i name sect runs top exitc
	printf '\nvm: ================================ summary ================================\n'
	say "kernel:     $kernel (Debian $KPKG $KPKGVER)"
	say "cgroup:     $([[ $cgfs == cgroup2 ]] && echo v2 || echo "NOT v2 ($cgfs)") - controllers: $ctrls; enabled at the root: $subtree"
	say "soft-dirty: $dirty ($criu_check)"
	say "timing:     /init reached ${BOOT_SECONDS:-?}s after qemu started; whole VM ${VM_SECONDS}s (limit ${TIMEOUT}s)"
	[[ $cgfs == cgroup2 ]] || fail+=("/sys/fs/cgroup in the guest is $cgfs, not cgroup2")
	[[ $dirty == on ]] || fail+=("soft-dirty tracking is not available in the guest")

	for i in "${!TESTS_NAME[@]}"; do
		name=${TESTS_NAME[$i]}
		sect=$(awk -v n="$NONCE" -v t="$name" '
			$1 == "FERRY-VM-BEGIN" && $2 == n && $3 == t { on = 1; next }
			$1 == "FERRY-VM-END" && $2 == n && $3 == t { print; on = 0; next }
			on' "$clean")
		exitc=$(awk -v n="$NONCE" -v t="$name" '$1 == "FERRY-VM-END" && $2 == n && $3 == t { sub(/^exit=/, "", $4); print $4 }' "$clean")
		local secs
		secs=$(awk -v n="$NONCE" -v t="$name" '$1 == "FERRY-VM-END" && $2 == n && $3 == t { for (i = 5; i <= NF; i++) if ($i ~ /^seconds=/) { sub(/^seconds=/, "", $i); print $i } }' "$clean")
		runs=$(grep -c '^=== RUN ' <<<"$sect" || true)
		top=$(grep -cE '^=== RUN +[^/ ]+$' <<<"$sect" || true)
		say "$name (-test.run '${TESTS_RUN[$i]}'): exit ${exitc:-none}, ${secs:-?}s, $top tests run ($runs with subtests)"
		grep -E '^--- (PASS|FAIL|SKIP): ' <<<"$sect" |
			awk '{ printf "vm:     %-5s %s %s\n", substr($2, 1, length($2) - 1), $3, $4 }' || true
		# A panic (a test's, or -test.timeout's) ends the binary without a
		# result line for the test that was running.
		grep -E '^panic: ' <<<"$sect" | head -n 3 | sed 's/^/vm:     /' || true
		if [[ -z $exitc ]]; then
			fail+=("$name: no END marker (the VM stopped while it ran)")
		elif [[ $exitc != 0 ]]; then
			fail+=("$name: exit $exitc")
		fi
		benches=$(grep -cE '^Benchmark[^ ]*[[:space:]]+[0-9]+' <<<"$sect" || true)
		if [[ -n ${TESTS_BENCH[$i]:-} ]]; then
			grep -E '^Benchmark' <<<"$sect" | sed 's/^/vm:     /' || true
			(( benches > 0 )) || fail+=("$name: no benchmark matched -test.bench '${TESTS_BENCH[$i]}' or none reported")
		elif (( runs == 0 )) || grep -q '^testing: warning: no tests to run' <<<"$sect"; then
			fail+=("$name: no test matched -test.run '${TESTS_RUN[$i]}'")
		fi
		if (( ! ALLOW_SKIP )) && grep -q '^--- SKIP: ' <<<"$sect"; then
			fail+=("$name: a top-level test skipped (--allow-skip permits it)")
		fi
	done
	if [[ $code != 0 ]] && (( ${#fail[@]} == 0 )); then
		fail+=("the guest reported exit $code (see the FERRY-VM lines above)")
	fi
	if (( ${#fail[@]} )); then
		printf 'vm: FAIL: %s\n' "${fail[@]}"
		exit 1
	fi
	say "PASS"
}

main() {
	parse_args "$@"
	WORK=$(mktemp -d /tmp/ferry-vm.XXXXXX)
	TESTS_NAME=()
	preflight
	fetch_kernel
	build_binaries
	build_initramfs
	run_qemu
	report
}

# One line, read whole before it runs: an edit of this file during a run
# cannot change what bash reads next.
{ main "$@"; exit; }
