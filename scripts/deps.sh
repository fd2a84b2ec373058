#!/usr/bin/env bash
# scripts/deps.sh - install everything ferry's build, demo and tests need on a
# Debian 12 (bookworm) amd64 machine, as root. Idempotent: a second run checks
# and changes nothing.
#
# Sources used, and nothing else:
#   - Debian's package archive through apt (the mirror the machine is
#     configured with), for bookworm packages and for CRIU 4.2 from forky (Debian 14);
#   - the Go module proxy, for the pinned code generators (go install).
#
# What it installs:
#   apt (bookworm):  iptables busybox-static runc protobuf-compiler iproute2 bpftool
#                    util-linux kmod cpio qemu-system-x86 procps psmisc socat
#                    (socat: the VM tier reads a hung guest's vCPU state from
#                    qemu's monitor socket)
#                    (never Debian 12's criu 3.17: it fails on this kernel)
#   /opt/ferry/criu          forky's criu + libcompel1 + their library closure
#                            (own libc), unpacked with dpkg -x; the system's
#                            libraries are not touched
#   /opt/ferry/bin/criu      wrapper running it through the prefix's ld.so
#   /usr/local/sbin/criu  -> /opt/ferry/bin/criu (first on root's PATH)
#   /opt/ferry/rootfs/busybox  default container rootfs
#   /opt/ferry/bin/protoc-gen-go, /opt/ferry/bin/protoc-gen-go-grpc
#
# Environment knobs (all optional):
#   FERRY_PREFIX   (default /opt/ferry)
#   FERRY_DEPS_SKIP_GO=1     do not install the Go code generators
set -euo pipefail

FERRY_PREFIX=${FERRY_PREFIX:-/opt/ferry}
FERRY_BIN=$FERRY_PREFIX/bin
CRIU_PREFIX=$FERRY_PREFIX/criu
CRIU_SUITE=forky
CRIU_WANT_RE='^4\.2(\.|$)'           # accepted criu upstream versions (4.2: dumps inet sockets on Linux 6.16+)
CRIU_LINK=/usr/local/sbin/criu
ROOTFS=$FERRY_PREFIX/rootfs/busybox

APT_PACKAGES=(iptables busybox-static runc protobuf-compiler iproute2 util-linux
	kmod cpio qemu-system-x86 procps psmisc bpftool libseccomp-dev pkg-config socat)
# Packages that forky's criu is always unpacked with, on top of what the
# resolver computes from the real Depends (a check, not a replacement).
CRIU_PACKAGES=(criu libcompel1)

PROTOC_GEN_GO=google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
PROTOC_GEN_GO_GRPC=google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.5.1

export DEBIAN_FRONTEND=noninteractive
APT_OPTS=(-q -o DPkg::Lock::Timeout=300)

INSTALLED=()   # what this run changed, for the report
TMP=""

say()  { printf 'deps: %s\n' "$*"; }
warn() { printf 'deps: WARNING: %s\n' "$*" >&2; }
die()  { printf 'deps: ERROR: %s\n' "$*" >&2; exit 1; }

cleanup() { if [[ -n $TMP && -d $TMP ]]; then rm -rf -- "$TMP"; fi; }
trap cleanup EXIT

# ---------------------------------------------------------------- preflight
preflight() {
	[[ $(id -u) -eq 0 ]] || die "preflight: must run as root"
	command -v apt-get >/dev/null && command -v dpkg >/dev/null ||
		die "preflight: apt-get/dpkg not found (this script is for Debian 12)"
	local arch codename=""
	arch=$(dpkg --print-architecture)
	[[ $arch == amd64 ]] || die "preflight: architecture $arch is not supported (amd64 only)"
	if [[ -r /etc/os-release ]]; then
		codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
	fi
	[[ $codename == bookworm ]] ||
		warn "preflight: this is '${codename:-unknown}', not Debian 12 bookworm; continuing"
	mkdir -p "$FERRY_BIN" "$FERRY_PREFIX/rootfs" /run/lock
	# One run at a time.
	exec 9>/run/lock/ferry-deps.lock
	flock -w 900 9 || die "preflight: another deps.sh run holds /run/lock/ferry-deps.lock"
}

# ------------------------------------------------------- Debian 12 packages
pkg_installed() {
	[[ $(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null) == ii* ]]
}

APT_UPDATED=0
apt_update_once() {
	(( APT_UPDATED )) && return 0
	say "apt: apt-get update"
	apt-get "${APT_OPTS[@]}" update >"$TMP/apt-update.log" 2>&1 || {
		cat "$TMP/apt-update.log" >&2
		die "apt: apt-get update failed (see above)"
	}
	APT_UPDATED=1
}

install_apt_packages() {
	local missing=() p
	for p in "${APT_PACKAGES[@]}"; do
		pkg_installed "$p" || missing+=("$p")
	done
	if (( ${#missing[@]} == 0 )); then
		say "apt: all ${#APT_PACKAGES[@]} packages already installed"
		return 0
	fi
	say "apt: missing: ${missing[*]}"
	apt_update_once
	for p in "${missing[@]}"; do
		local cand
		cand=$(apt-cache policy "$p" 2>/dev/null | awk '/Candidate:/{print $2}')
		[[ -n $cand && $cand != "(none)" ]] ||
			die "apt: package '$p' has no installation candidate in the configured Debian archive"
	done
	# Never let anything pull Debian 12's criu (3.17 fails on this kernel:
	# "vdso: Unexpected rt vDSO area bounds"). runc Recommends it;
	# --no-install-recommends keeps it out, and this checks.
	local sim
	sim=$(apt-get "${APT_OPTS[@]}" install -s --no-install-recommends "${missing[@]}" 2>&1) || {
		printf '%s\n' "$sim" >&2
		die "apt: simulated install of '${missing[*]}' failed"
	}
	if grep -qE '^Inst criu ' <<<"$sim"; then
		die "apt: installing '${missing[*]}' would pull Debian's criu package; refusing"
	fi
	apt-get "${APT_OPTS[@]}" install -y --no-install-recommends "${missing[@]}" \
		>"$TMP/apt-install.log" 2>&1 || {
		tail -n 40 "$TMP/apt-install.log" >&2
		die "apt: apt-get install ${missing[*]} failed (see above)"
	}
	for p in "${missing[@]}"; do
		pkg_installed "$p" || die "apt: package '$p' is still not installed after apt-get install"
		INSTALLED+=("$p=$(dpkg-query -W -f='${Version}' "$p")")
	done
	say "apt: installed ${missing[*]}"
}

check_no_debian_criu() {
	if pkg_installed criu; then
		warn "Debian's criu $(dpkg-query -W -f='${Version}' criu) is installed (/usr/sbin/criu, broken on this kernel);" \
			"$CRIU_LINK shadows it on PATH, but anything naming /usr/sbin/criu gets the broken one"
	fi
}

# ------------------------------------------------- CRIU 4.2 from forky
# The archive URI the machine uses for bookworm itself (main), e.g.
# http://deb.debian.org/debian/ or a proxy/mirror.
debian_mirror() {
	local codename uri
	codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}") || true
	codename=${codename:-bookworm}
	uri=$(apt-get indextargets --no-release-info --format '$(REPO_URI) $(RELEASE) $(COMPONENT)' \
		'Created-By: Packages' 2>/dev/null |
		awk -v c="$codename" '$2 == c && $3 == "main" { print $1; exit }')
	[[ -n $uri ]] || die "criu: no '$codename main' source in /etc/apt/sources.list(.d); cannot tell which Debian mirror to use"
	printf '%s\n' "${uri%/}"
}

criu_wrapper_text() {
	local libpath=$1
	cat <<EOF
#!/bin/sh
# Generated by ferry's scripts/deps.sh. Do not edit.
# Runs Debian 14 (forky) criu unpacked in $CRIU_PREFIX with that prefix's own
# glibc, through its dynamic loader; the system's libraries are not used.
# (--library-path, unlike LD_LIBRARY_PATH, is not inherited by programs criu
# runs, e.g. iptables-restore or action scripts.)
exec $CRIU_PREFIX/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 \\
	--library-path $libpath \\
	--argv0 "\$0" \\
	$CRIU_PREFIX/usr/sbin/criu "\$@"
EOF
}

criu_is_current() {
	[[ -f $CRIU_PREFIX/.ferry-version && -x $FERRY_BIN/criu && -x $CRIU_PREFIX/usr/sbin/criu ]] || return 1
	[[ $(readlink "$CRIU_LINK" 2>/dev/null) == "$FERRY_BIN/criu" ]] || return 1
	local stamp ver
	stamp=$(<"$CRIU_PREFIX/.ferry-version")
	[[ $stamp =~ $CRIU_WANT_RE ]] || return 1
	ver=$("$FERRY_BIN/criu" --version 2>/dev/null | awk '/^Version:/{print $2}') || return 1
	[[ $ver == "$stamp" ]]
}

install_criu() {
	if criu_is_current; then
		say "criu: $(<"$CRIU_PREFIX/.ferry-version") already installed at $CRIU_PREFIX (stamp ok)"
		return 0
	fi
	local mirror keyring="" aptdir="$TMP/apt-$CRIU_SUITE"
	mirror=$(debian_mirror)
	say "criu: fetching criu from Debian $CRIU_SUITE via $mirror (private apt state in $aptdir)"

	# A private apt setup: own sources list, state, lists and cache, so the
	# machine's own apt configuration and state stay untouched. apt.conf(.d)
	# is still read (proxy settings apply).
	mkdir -p "$aptdir/etc/sources.list.d" "$aptdir/etc/preferences.d" \
		"$aptdir/state/lists/partial" "$aptdir/cache/archives/partial" "$aptdir/debs"
	: >"$aptdir/state/status"
	[[ -r /usr/share/keyrings/debian-archive-keyring.gpg ]] &&
		keyring="signed-by=/usr/share/keyrings/debian-archive-keyring.gpg"
	printf 'deb [arch=amd64%s] %s %s main\n' "${keyring:+ $keyring}" "$mirror" "$CRIU_SUITE" \
		>"$aptdir/etc/sources.list"
	# Let apt's unprivileged _apt user write its downloads (no sandbox warning).
	chmod 755 "$TMP" "$aptdir"
	if id _apt >/dev/null 2>&1; then
		chown _apt "$aptdir/state/lists/partial" "$aptdir/cache/archives/partial" "$aptdir/debs"
	fi
	local o=(-q -o "Dir::State=$aptdir/state" -o "Dir::State::status=$aptdir/state/status"
		-o "Dir::Cache=$aptdir/cache" -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache="
		-o "Dir::Etc::SourceList=$aptdir/etc/sources.list"
		-o "Dir::Etc::SourceParts=$aptdir/etc/sources.list.d"
		-o "Dir::Etc::Preferences=$aptdir/etc/preferences"
		-o "Dir::Etc::PreferencesParts=$aptdir/etc/preferences.d"
		-o "APT::Architecture=amd64" -o "APT::Architectures::=amd64"
		-o "Acquire::Languages=none"
		-o "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false"
		-o "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false"
		-o "APT::Get::List-Cleanup=false")

	apt-get "${o[@]}" update >"$aptdir/update.log" 2>&1 || {
		cat "$aptdir/update.log" >&2
		die "criu: apt-get update of $mirror $CRIU_SUITE failed (see above; is the signing key in debian-archive-keyring?)"
	}
	local cand
	cand=$(apt-cache "${o[@]}" policy criu 2>/dev/null | awk '/Candidate:/{print $2}')
	[[ -n $cand && $cand != "(none)" ]] || die "criu: no criu package in $mirror $CRIU_SUITE"
	local upstream=${cand#*:}; upstream=${upstream%-*}
	[[ $upstream =~ $CRIU_WANT_RE ]] ||
		die "criu: $CRIU_SUITE offers criu $cand, want 4.2.x"

	# The dependency closure, from the real Depends (empty status file, so
	# apt resolves everything down to libc6).
	local sim pkgs=() p
	sim=$(apt-get "${o[@]}" install -s --no-install-recommends "${CRIU_PACKAGES[@]}" 2>&1) || {
		printf '%s\n' "$sim" >&2
		die "criu: resolving the dependencies of ${CRIU_PACKAGES[*]} in $CRIU_SUITE failed"
	}
	mapfile -t pkgs < <(awk '/^Inst /{print $2}' <<<"$sim")
	for p in "${CRIU_PACKAGES[@]}" libc6; do
		printf '%s\n' "${pkgs[@]}" | grep -qx "$p" || die "criu: resolver did not select $p"
	done
	say "criu: $CRIU_SUITE packages (${#pkgs[@]}): ${pkgs[*]}"

	( cd "$aptdir/debs" && apt-get "${o[@]}" download "${pkgs[@]}" ) >"$aptdir/download.log" 2>&1 || {
		tail -n 30 "$aptdir/download.log" >&2
		die "criu: apt-get download from $CRIU_SUITE failed (see above)"
	}

	# Unpack into a fresh staging prefix, then swap it in.
	local stage=$CRIU_PREFIX.new
	rm -rf -- "$stage"
	mkdir -p "$stage"
	local deb
	for p in "${pkgs[@]}"; do
		deb=$(compgen -G "$aptdir/debs/${p}_*.deb" | head -n1) || true
		[[ -n $deb ]] || die "criu: downloaded .deb for $p not found"
		dpkg-deb -x "$deb" "$stage" || die "criu: dpkg -x $deb failed"
		# Manifest of what the prefix holds: "package version".
		dpkg-deb -W --showformat='${Package} ${Version}\n' "$deb" >>"$stage/.ferry-packages"
	done

	local ld=$stage/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
	[[ -x $ld && -x $stage/usr/sbin/criu ]] || die "criu: unpacked prefix lacks usr/sbin/criu or ld-linux-x86-64.so.2"
	# Every library directory of the prefix (forky is /usr-merged).
	local dirs=() d libpath stagepath
	for d in usr/lib/x86_64-linux-gnu lib/x86_64-linux-gnu usr/lib lib; do
		compgen -G "$stage/$d/*.so*" >/dev/null && dirs+=("$d")
	done
	libpath=$(printf "$CRIU_PREFIX/%s:" "${dirs[@]}"); libpath=${libpath%:}
	stagepath=$(printf "$stage/%s:" "${dirs[@]}"); stagepath=${stagepath%:}

	# Every library criu needs must resolve inside the prefix, never from /lib.
	local list
	list=$("$ld" --library-path "$stagepath" --list "$stage/usr/sbin/criu" 2>&1) ||
		{ printf '%s\n' "$list" >&2; die "criu: ld.so --list of the unpacked criu failed"; }
	if grep -E '=>' <<<"$list" | grep -vE "=> $stage/" | grep -q .; then
		printf '%s\n' "$list" >&2
		die "criu: some libraries of criu resolve outside $stage (a package missing from the closure)"
	fi
	local ver
	ver=$("$ld" --library-path "$stagepath" "$stage/usr/sbin/criu" --version 2>&1 | awk '/^Version:/{print $2}')
	[[ $ver =~ $CRIU_WANT_RE ]] || die "criu: unpacked criu does not run or is not 4.2.x (got '${ver:-nothing}')"
	printf '%s\n' "$ver" >"$stage/.ferry-version"

	rm -rf -- "$CRIU_PREFIX"
	mv -- "$stage" "$CRIU_PREFIX"
	criu_wrapper_text "$libpath" >"$FERRY_BIN/criu.tmp"
	chmod 755 "$FERRY_BIN/criu.tmp"
	mv -f -- "$FERRY_BIN/criu.tmp" "$FERRY_BIN/criu"
	link_criu
	INSTALLED+=("criu=$ver($CRIU_SUITE)")

	verify_criu "$ver"
}

link_criu() {
	mkdir -p "$(dirname "$CRIU_LINK")"
	if [[ -e $CRIU_LINK && ! -L $CRIU_LINK ]]; then
		warn "criu: moving existing $CRIU_LINK to $CRIU_LINK.ferry-bak"
		mv -f -- "$CRIU_LINK" "$CRIU_LINK.ferry-bak"
	fi
	ln -sfn "$FERRY_BIN/criu" "$CRIU_LINK"
}

verify_criu() {
	local want=$1 ver out
	ver=$("$FERRY_BIN/criu" --version 2>&1 | awk '/^Version:/{print $2}')
	[[ $ver == "$want" ]] || die "criu: the wrapper $FERRY_BIN/criu reports '${ver:-nothing}', want $want"
	local first
	first=$(command -v criu || true)
	[[ $first == "$CRIU_LINK" || $first == "$FERRY_BIN/criu" ]] ||
		warn "criu: 'criu' on PATH is ${first:-nothing}, not $CRIU_LINK"
	# Kernel features. On kernels without CONFIG_MEM_SOFT_DIRTY this still
	# says "Looks good" with a soft-dirty warning; anything else is reported
	# but is a kernel matter, not an install failure.
	if out=$("$FERRY_BIN/criu" check 2>&1) && grep -q 'Looks good' <<<"$out"; then
		say "criu: 'criu check': Looks good"
		if "$FERRY_BIN/criu" check --feature mem_dirty_track >/dev/null 2>&1; then
			say "criu: memory dirty tracking (soft-dirty) available: pre-copy can run here"
		else
			say "criu: memory dirty tracking (soft-dirty) NOT available: pre-dump/pre-copy cannot run here"
		fi
	else
		warn "criu: 'criu check' did not say 'Looks good'; output:"
		printf '%s\n' "$out" | sed 's/^/    /' >&2
	fi
}

# ------------------------------------------------------ busybox rootfs
install_rootfs() {
	local bb=/bin/busybox bbver
	[[ -x $bb ]] || bb=/usr/bin/busybox
	[[ -x $bb ]] || die "rootfs: /bin/busybox not found (package busybox-static)"
	bbver=$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null) ||
		die "rootfs: busybox-static is not installed"
	# Bump "layout N" when the tree this function builds changes.
	local stamp="layout 2; busybox-static $bbver"
	if [[ -f $ROOTFS/.ferry-stamp && $(<"$ROOTFS/.ferry-stamp") == "$stamp" && -x $ROOTFS/bin/busybox ]]; then
		say "rootfs: $ROOTFS already built ($stamp)"
		return 0
	fi
	say "rootfs: building $ROOTFS from $bb ($stamp)"
	local stage=$ROOTFS.new d
	rm -rf -- "$stage"
	mkdir -p "$stage"
	for d in bin sbin usr/bin usr/sbin proc sys dev etc root tmp var var/tmp run; do
		mkdir -p "$stage/$d"
	done
	chmod 1777 "$stage/tmp" "$stage/var/tmp"
	chmod 700 "$stage/root"
	ln -s ../run "$stage/var/run"
	cp -- "$bb" "$stage/bin/busybox" || die "rootfs: copying $bb failed"
	chmod 755 "$stage/bin/busybox"
	# Applets as relative symlinks (they resolve both inside the container
	# and when the tree is looked at from the host).
	local applet up n=0
	while read -r applet; do
		applet=${applet#/}
		[[ -n $applet && $applet != bin/busybox ]] || continue
		[[ -e $stage/$applet || -L $stage/$applet ]] && continue
		mkdir -p "$stage/$(dirname "$applet")"
		up=$(dirname "$applet")
		if [[ $up == . ]]; then up=bin/; elif [[ $up == bin ]]; then up=""; else up=$(sed -E 's#[^/]+#..#g; s#$#/bin/#' <<<"$up"); fi
		ln -s "${up}busybox" "$stage/$applet"
		n=$((n + 1))
	done < <("$bb" --list-full) 
	(( n > 100 )) || die "rootfs: only $n busybox applets linked ('busybox --list-full' failed?)"
	[[ -L $stage/bin/sh ]] || die "rootfs: bin/sh applet missing"
	cat >"$stage/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
	cat >"$stage/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
EOF
	echo ferry >"$stage/etc/hostname"
	# Sanity: the shell runs inside the tree.
	chroot "$stage" /bin/sh -c 'echo ok' >/dev/null 2>&1 || die "rootfs: chroot $stage /bin/sh does not run"
	printf '%s\n' "$stamp" >"$stage/.ferry-stamp"
	rm -rf -- "$ROOTFS"
	mv -- "$stage" "$ROOTFS"
	INSTALLED+=("rootfs=$ROOTFS($n applets)")
}

# ---------------------------------------------- Go code generators
go_tool_version() { # binary -> module version it was built from, or empty
	[[ -x $1 ]] || return 0
	go version -m "$1" 2>/dev/null | awk '$1 == "mod" { print $3; exit }'
}

install_go_tools() {
	if [[ ${FERRY_DEPS_SKIP_GO:-} == 1 ]]; then
		say "go: skipped (FERRY_DEPS_SKIP_GO=1)"
		return 0
	fi
	command -v go >/dev/null || die "go: the go command is not on PATH (Go is needed to build ferry)"
	# The module proxy only: never fall back to fetching from VCS hosts.
	local gp
	gp=$(go env GOPROXY); gp=${gp//,direct/}; gp=${gp//|direct/}
	[[ -n $gp && $gp != direct && $gp != off ]] ||
		die "go: GOPROXY is '$(go env GOPROXY)'; a module proxy is needed (e.g. https://proxy.golang.org)"
	local spec name want have
	for spec in "$PROTOC_GEN_GO" "$PROTOC_GEN_GO_GRPC"; do
		name=${spec%@*}; name=${name##*/}; want=${spec##*@}
		have=$(go_tool_version "$FERRY_BIN/$name")
		if [[ $have == "$want" ]]; then
			say "go: $name $want already installed"
			continue
		fi
		say "go: go install $spec (module proxy)"
		( cd / && GOBIN=$FERRY_BIN GOPROXY=$gp GOTOOLCHAIN=local go install "$spec" ) \
			>"$TMP/go-$name.log" 2>&1 || {
			cat "$TMP/go-$name.log" >&2
			die "go: go install $spec failed (see above)"
		}
		have=$(go_tool_version "$FERRY_BIN/$name")
		[[ $have == "$want" ]] || die "go: $FERRY_BIN/$name reports module version '${have:-none}', want $want"
		INSTALLED+=("$name=$want")
	done
}

# ------------------------------------------------------------ summary
summary() {
	local runc protoc qemu ipt bb
	runc=$(runc --version 2>/dev/null | awk '/^runc version/{print $3; exit}')
	protoc=$(protoc --version 2>/dev/null | awk '{print $2}')
	qemu=$(qemu-system-x86_64 --version 2>/dev/null | awk 'NR==1{print $4}')
	ipt=$(iptables --version 2>/dev/null | awk '{print $2, $3}')
	bb=$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null)
	if (( ${#INSTALLED[@]} )); then
		say "installed this run: ${INSTALLED[*]}"
	else
		say "installed this run: nothing (everything was already in place)"
	fi
	say "criu $(<"$CRIU_PREFIX/.ferry-version") at $FERRY_BIN/criu ($CRIU_LINK -> it);" \
		"busybox rootfs at $ROOTFS (busybox-static $bb);" \
		"runc ${runc:-?}; protoc ${protoc:-?}; qemu-system-x86_64 ${qemu:-?}; iptables ${ipt:-?};" \
		"protoc-gen-go $(go_tool_version "$FERRY_BIN/protoc-gen-go" || true)" \
		"and protoc-gen-go-grpc $(go_tool_version "$FERRY_BIN/protoc-gen-go-grpc" || true) in $FERRY_BIN;" \
		"done in ${SECONDS}s"
}

main() {
	SECONDS=0
	TMP=$(mktemp -d /tmp/ferry-deps.XXXXXX)
	preflight
	install_apt_packages
	check_no_debian_criu
	install_criu
	install_rootfs
	install_go_tools
	summary
}

main "$@"
