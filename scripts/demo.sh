#!/usr/bin/env bash
# scripts/demo.sh - ferry's main job on built-in defaults, end to end (run as root;
# `make demo` builds first and passes the bin dir):
#
#   1. a private ferryd: temporary --root/--run-dir/--socket/--bpf-root, cgroup parent
#      /ferry-demo-PID, in a network namespace of its own (its bridge ferry0 and the
#      containers' veths never touch the machine's namespace)
#   2. start ferryd, wait for it, `ferryctl version`
#   3. run a counting container on the default (busybox) rootfs with limits
#   4. ps, inspect, logs, exec
#   5. kill -9 ferryd: the container keeps counting; restart ferryd, it reattaches
#   6. stop, rm, SIGTERM ferryd, and check that nothing is left on the host
#
# Usage: scripts/demo.sh [BIN_DIR]   (default: the repo's bin/)
#
# Everything the demo creates lives in one mktemp -d directory and one cgroup
# parent; the EXIT trap removes all of it, also when a step fails or the
# script is interrupted. Exit status 0 and a final "demo: OK" line only when
# every step passed and nothing was left behind.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${1:-$REPO/bin}

TMP=""              # temp dir holding root, run dir, socket and ferryd's log
R="" D="" S="" LOG=""
P=/ferry-demo-$$    # cgroup parent, in every hierarchy
NS=ferry-demo-$$    # the demo host's network namespace: its bridge and veths live there
FERRYD_PID=""       # the running ferryd we started, if any
CTL_TIMEOUT=30      # seconds any single ferryctl call may take

# ------------------------------------------------------------------ output
banner() { printf '\n==> %s\n' "$*"; }
note()   { printf '    %s\n' "$*"; }
die()    { printf 'demo: ERROR: %s\n' "$*" >&2; exit 1; }

# quote prints its arguments as a shell would need them typed.
quote() {
	local a e out=()
	for a in "$@"; do
		if [[ $a =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
			out+=("$a")
		else
			e=${a//\'/\'\\\'\'}
			out+=("'$e'")
		fi
	done
	printf '%s' "${out[*]}"
}

# ctl runs ferryctl against our ferryd (bounded), quietly.
ctl() { timeout "$CTL_TIMEOUT" "$BIN/ferryctl" --socket "$S" "$@"; }

# show echoes a ferryctl command, then runs it.
show() {
	printf '$ ferryctl %s\n' "$(quote "$@")"
	ctl "$@"
}

# ------------------------------------------------------------------ helpers
# pid_alive PID: the process exists and is not a zombie.
pid_alive() {
	local st
	st=$(sed -n 's/.*) \(.\).*/\1/p' "/proc/$1/stat" 2>/dev/null) || return 1
	[[ -n $st && $st != Z ]]
}

# wait_gone PID SECONDS: wait until PID is gone (or a zombie).
wait_gone() {
	local i
	for ((i = 0; i < $2 * 10; i++)); do
		pid_alive "$1" || return 0
		sleep 0.1
	done
	return 1
}

# ferry_procs: ferryd processes (daemon or `ferryd monitor`) of this demo,
# i.e. whose command line names the temp dir.
ferry_procs() {
	local f pid
	[[ -n $TMP ]] || return 0
	for f in $(grep -laF -- "$TMP" /proc/[0-9]*/cmdline 2>/dev/null); do
		pid=${f#/proc/}; pid=${pid%/cmdline}
		[[ $pid == "$$" ]] && continue
		[[ $(cmdline_of "$pid") == *ferryd* ]] && printf '%s\n' "$pid"
	done
	return 0
}

# cmdline_of PID: a process's command line, space-separated.
cmdline_of() { { tr '\0' ' ' <"/proc/$1/cmdline"; } 2>/dev/null | sed 's/ $//'; }

# monitors: the `ferryd monitor` processes of this demo.
monitors() {
	local pid
	for pid in $(ferry_procs); do
		[[ " $(cmdline_of "$pid") " == *" monitor "* ]] && printf '%s\n' "$pid"
	done
	return 0
}

# mounts_under DIR: mount points at or below DIR, deepest first.
mounts_under() {
	[[ -n $1 ]] || return 0
	awk -v d="$1" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r
}

# cgroup_dirs [MINDEPTH]: directories of our cgroup parent in every hierarchy, children first.
cgroup_dirs() {
	local h
	for h in /sys/fs/cgroup/*/; do
		[[ -d $h${P#/} ]] && find "$h${P#/}" -mindepth "${1:-0}" -depth -type d
	done
	return 0
}

# last_count: the highest "count N" the counter wrote to its log file.
last_count() {
	local f=$R/containers/counter/container.log
	{ grep -a '^count [0-9]*$' "$f" 2>/dev/null || true; } | tail -n 1 | sed 's/^count //'
}

# wait_count_above N SECONDS: wait until the log holds a count above N.
wait_count_above() {
	local i c
	for ((i = 0; i < $2 * 10; i++)); do
		c=$(last_count)
		[[ -n $c && $c -gt $1 ]] && return 0
		sleep 0.1
	done
	die "the counter's log did not pass count $1 within $2 s"
}

# inspect_field NAME KEY: a top-level number or string field of `ferryctl inspect NAME`.
inspect_field() {
	{ ctl inspect "$1" || true; } | sed -n "s/^  \"$2\": *\"\{0,1\}\([^\",]*\)\"\{0,1\},\{0,1\}\$/\1/p" | head -n 1
}

start_ferryd() {
	# --pressure-source parent: the harden/relax detector watches the containers'
	# own PSI; this machine is shared, and host-wide CPU pressure from others'
	# work would harden the demo's node for reasons it cannot show.
	local args=(--root "$R" --run-dir "$D" --socket "$S" --cgroup-parent "$P" --bpf-root "$TMP/bpffs/ferry"
		--pressure-source parent)
	if [[ ! -e /run/netns/$NS ]]; then
		printf '$ ip netns add %s    # the demo host\n' "$NS"
		ip netns add "$NS" || die "ip netns add $NS failed"
	fi
	printf '$ nsenter --net=/run/netns/%s ferryd %s >>%s 2>&1 &\n' "$NS" "$(quote "${args[@]}")" "$LOG"
	# Its own session, so a Ctrl-C in the terminal reaches only this script,
	# whose cleanup still needs a running ferryd to remove the containers.
	if command -v setsid >/dev/null; then
		setsid nsenter --net=/run/netns/"$NS" "$BIN/ferryd" "${args[@]}" >>"$LOG" 2>&1 </dev/null &
	else
		nsenter --net=/run/netns/"$NS" "$BIN/ferryd" "${args[@]}" >>"$LOG" 2>&1 </dev/null &
	fi
	FERRYD_PID=$!
	local i
	for ((i = 0; i < 100; i++)); do # 10 s
		if ! pid_alive "$FERRYD_PID"; then
			FERRYD_PID=""
			tail -n 20 "$LOG" | sed 's/^/    ferryd: /' >&2
			die "ferryd exited during startup (log above)"
		fi
		if ctl version >/dev/null 2>&1; then
			note "ferryd (pid $FERRYD_PID) answers on $S"
			return 0
		fi
		sleep 0.1
	done
	die "ferryd did not answer on $S within 10 s"
}

# stop_ferryd SIGNAL SECONDS: signal ferryd and wait for it; returns its exit status.
# (stderr is muted while it is reaped: bash would report "Killed" for kill -9.)
stop_ferryd() {
	local pid=$FERRYD_PID rc=0 gone=1
	[[ -n $pid ]] || return 0
	{
		kill "-$1" "$pid" || true
		if ! wait_gone "$pid" "$2"; then
			gone=0
			kill -KILL "$pid" || true
		fi
		wait "$pid" || rc=$?
	} 2>/dev/null
	FERRYD_PID=""
	if ((gone == 0)); then
		printf 'demo: ferryd did not exit within %s s of SIG%s; killed it\n' "$2" "$1" >&2
		return 1
	fi
	return "$rc"
}

# ------------------------------------------------------------------ cleanup
cleanup() {
	local rc=$? pid d m i left=()
	trap - EXIT
	trap '' INT TERM HUP # every wait below is bounded; do not leave half a cleanup
	set +e
	CTL_TIMEOUT=15
	[[ -z $TMP ]] && { ((rc == 0)) || printf 'demo: FAILED (exit %d)\n' "$rc" >&2; exit "$rc"; }
	if ((rc != 0)); then
		printf '\n==> cleanup after a failure (exit %d)\n' "$rc"
		if [[ -s $LOG ]]; then
			note "last lines of ferryd's log:"
			tail -n 15 "$LOG" | sed 's/^/    | /'
		fi
	else
		banner "cleanup"
	fi
	# Containers first, through ferryd while it is up.
	if [[ -n $FERRYD_PID ]] && ! pid_alive "$FERRYD_PID"; then
		note "ferryd (pid $FERRYD_PID) is not running; removing by hand"
	elif [[ -n $FERRYD_PID ]]; then
		local names
		if names=$(ctl ps -o json 2>&1); then
			for d in $(printf '%s\n' "$names" | grep -o '"name": *"[^"]*"' | sed 's/.*"\([^"]*\)"$/\1/'); do
				note "removing container $d: ferryctl rm -f $d"
				ctl rm -f "$d" >/dev/null 2>&1 || note "ferryctl rm -f $d failed"
			done
		else
			note "ferryd (pid $FERRYD_PID) does not answer ($names); removing by hand"
		fi
	fi
	if [[ -n $FERRYD_PID ]]; then
		stop_ferryd TERM 10 || true
	fi
	# Whatever ferryd did not remove: monitors (and a ferryd we lost track of),
	# then the processes left in our cgroups.
	for pid in $(ferry_procs); do
		note "killing leftover process $pid: $(cmdline_of "$pid")"
		kill -KILL "$pid" 2>/dev/null
	done
	for d in $(cgroup_dirs); do
		for pid in $(cat "$d/cgroup.procs" 2>/dev/null); do
			note "killing leftover process $pid in cgroup $d"
			kill -KILL "$pid" 2>/dev/null
		done
	done
	for m in $(mounts_under "$TMP"); do
		note "unmounting $m"
		umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || note "umount $m failed"
	done
	for ((i = 0; i < 50; i++)); do # 5 s: killed tasks take a moment to leave their cgroups
		for d in $(cgroup_dirs); do rmdir "$d" 2>/dev/null; done
		[[ -z $(cgroup_dirs) ]] && break
		sleep 0.1
	done
	if [[ -e /run/netns/$NS ]]; then
		ip netns del "$NS" 2>/dev/null || note "ip netns del $NS failed"
	fi
	# Never rm -rf across a mount point.
	if [[ -z $(mounts_under "$TMP") ]]; then
		rm -rf -- "$TMP"
	fi

	# What is left?
	for d in $(cgroup_dirs); do left+=("cgroup $d"); done
	for m in $(mounts_under "$TMP"); do left+=("mount $m"); done
	for pid in $(ferry_procs); do left+=("process $pid: $(cmdline_of "$pid")"); done
	[[ -e $TMP ]] && left+=("directory $TMP")
	[[ -e /run/netns/$NS ]] && left+=("network namespace $NS")
	if ((${#left[@]} > 0)); then
		printf 'demo: left on the host:\n' >&2
		printf '    %s\n' "${left[@]}" >&2
		((rc == 0)) && rc=1
	else
		note "removed $TMP and cgroup parent $P: nothing left (no cgroups, mounts, processes or files)"
	fi
	if ((rc == 0)); then
		printf '\ndemo: OK\n'
	else
		printf '\ndemo: FAILED (exit %d)\n' "$rc" >&2
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'printf "\ndemo: interrupted (SIGINT)\n" >&2; exit 130' INT
trap 'printf "\ndemo: terminated (SIGTERM)\n" >&2; exit 143' TERM
trap 'exit 129' HUP

# ------------------------------------------------------------------ preflight
[[ $(id -u) -eq 0 ]] || die "run as root (ferryd creates cgroups, mounts and namespaces)"
for b in ferryd ferryctl; do
	[[ -x $BIN/$b ]] || die "$BIN/$b not found or not executable (build with: make build)"
done
BIN=$(cd "$BIN" && pwd)
command -v timeout >/dev/null || die "timeout (coreutils) is required"
ROOTFS=$("$BIN/ferryd" --help 2>&1 | sed -n 's/.*--default-rootfs .*(default "\([^"]*\)").*/\1/p')
if [[ -n $ROOTFS && ! -e $ROOTFS/bin/sh ]]; then
	die "the default rootfs $ROOTFS is missing (install it with: make deps)"
fi

# ------------------------------------------------------------------ 1. setup
banner "1/6 a private ferryd: temporary state, socket and cgroup parent"
TMP=$(mktemp -d /tmp/ferry-demo.XXXXXX)
R=$TMP/root D=$TMP/run S=$TMP/run/ferryd.sock LOG=$TMP/ferryd.log
export FERRY_SOCKET=$S
note "binaries:      $BIN"
note "state (root):  $R"
note "run dir:       $D"
note "socket:        $S   (exported as FERRY_SOCKET, so plain 'ferryctl' finds it)"
note "cgroup parent: $P"
note "ferryd's log:  $LOG"
note "default rootfs: ${ROOTFS:-?}"

# ------------------------------------------------------------------ 2. start
banner "2/6 start ferryd"
start_ferryd
show version

# ------------------------------------------------------------------ 3. run
banner "3/6 run a counting container on the default rootfs"
COUNTER='i=0; while true; do i=$((i+1)); echo "count $i"; sleep 0.5; done'
show run counter --mem-guarantee 32M --mem-limit 64M --cpu-guarantee 0.25 --cpu-limit 0.5 -- sh -c "$COUNTER"

# ------------------------------------------------------------------ 4. look at it
banner "4/6 look at it: ps, inspect, logs, exec"
show ps
show inspect counter
INIT_PID=$(inspect_field counter pid)
[[ $INIT_PID =~ ^[0-9]+$ && $INIT_PID -gt 0 ]] || die "no init pid in 'ferryctl inspect counter'"
note "the container's init runs as host pid $INIT_PID; its cgroup: $(inspect_field counter cgroup)"
note "memory limit in the kernel: $(cat "/sys/fs/cgroup/memory$P/counter/memory.limit_in_bytes" 2>/dev/null || echo '?') bytes," \
	"cpu quota: $(cat "/sys/fs/cgroup/cpu$P/counter/cpu.cfs_quota_us" 2>/dev/null || echo '?')/$(cat "/sys/fs/cgroup/cpu$P/counter/cpu.cfs_period_us" 2>/dev/null || echo '?') us"
wait_count_above 3 10
echo '$ ferryctl logs counter | tail -n 3'
ctl logs counter | tail -n 3
show exec counter -- hostname
show exec counter -- ip -4 -o addr show eth0
show exec counter -- sh -c 'grep CapEff /proc/1/status; ps'

# ------------------------------------------------------------------ 5. crash ferryd
banner "5/6 kill -9 ferryd: the container keeps running; restart ferryd and it reattaches"
printf '$ kill -9 %s    # ferryd\n' "$FERRYD_PID"
stop_ferryd KILL 10 || true # exit status 137 is the point
pid_alive "$INIT_PID" || die "the container's init (pid $INIT_PID) died with ferryd"
note "ferryd is gone; the container's init (pid $INIT_PID) is alive: $(cmdline_of "$INIT_PID")"
note "its monitor (ferryd monitor, own session) is alive too: pid $(monitors | paste -sd ' ')"
c1=$(last_count)
sleep 2
c2=$(last_count)
note "log file $R/containers/counter/container.log: count $c1, 2 s later count $c2"
[[ -n $c1 && -n $c2 && $c2 -gt $c1 ]] || die "the container's log did not grow while ferryd was down"
start_ferryd
show ps
PID2=$(inspect_field counter pid)
STATE2=$(inspect_field counter state)
[[ $STATE2 == running && $PID2 == "$INIT_PID" ]] ||
	die "after the restart: counter is $STATE2 with pid $PID2, want running with pid $INIT_PID"
note "ferryd reattached: counter is $STATE2, same init pid $PID2"
wait_count_above "$c2" 10
echo '$ ferryctl logs counter | tail -n 3'
ctl logs counter | tail -n 3
c3=$({ ctl logs counter || true; } | { grep -a '^count [0-9]*$' || true; } | tail -n 1 | sed 's/^count //')
[[ -n $c3 && $c3 -gt $c2 ]] || die "ferryctl logs shows count ${c3:-none}, want more than $c2"
note "still counting: $c2 while ferryd was down, $c3 now"

# ------------------------------------------------------------------ 6. stop and clean up
banner "6/6 stop, remove, stop ferryd, and check that nothing is left"
show stop counter --timeout 1s
note "counter is $(inspect_field counter state), exit code $(inspect_field counter exit_code)"
show rm counter
show ps
if pid_alive "$INIT_PID"; then die "the container's init (pid $INIT_PID) is still alive after stop and rm"; fi
printf '$ kill -TERM %s    # ferryd\n' "$FERRYD_PID"
rc=0
stop_ferryd TERM 15 || rc=$?
((rc == 0)) || die "ferryd exited with status $rc after SIGTERM"
note "ferryd exited cleanly"
problems=0
if [[ -n $(cgroup_dirs 1) ]]; then
	note "LEFT: cgroups under $P:" $(cgroup_dirs 1)
	problems=1
else
	note "no container cgroups under $P (the empty parent, in $(cgroup_dirs | wc -l) hierarchies, goes in the cleanup below)"
fi
# The node's own mounts stay by design (they outlive ferryd restarts): the
# shared mount point for container netns files and the bpffs holding the
# sysctl guards' pins. Anything else under $TMP is a container's leftover.
ctr_mounts=$(mounts_under "$TMP" | grep -v -x -e "$D/netns" -e "$TMP/bpffs" || true)
if [[ -n $ctr_mounts ]]; then
	note "LEFT: mounts under $TMP:" $ctr_mounts
	problems=1
else
	note "no container mounts (the node's netns mount point and bpffs go in the cleanup below)"
fi
if [[ -n $(ferry_procs) ]]; then
	note "LEFT: processes:" $(ferry_procs)
	problems=1
else
	note "no ferryd or monitor processes"
fi
[[ -d $R/containers/counter ]] && { note "LEFT: $R/containers/counter"; problems=1; }
((problems == 0)) || die "ferry left things behind (listed above)"
exit 0
