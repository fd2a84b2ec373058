#!/usr/bin/env bash
# scripts/demo.sh - ferry's main job on built-in defaults, end to end (run as root;
# `make demo` builds first and passes the bin dir):
#
#   1. two private hosts, A and B: each a network namespace of its own (its bridge
#      ferry0 and the containers' veths never touch the machine's namespace) with
#      a ferryd on temporary --root/--run-dir/--socket/--bpf-root and a cgroup
#      parent of its own (/ferry-demo-PID, /ferry-demo-PID-b); one subnet
#      10.88.0.0/24, A allocates from 10.88.0.0/26, B from 10.88.0.64/26; the
#      node certificates for their mutual-TLS listeners come from `ferryctl certs`
#   2. start ferryd on A, `ferryctl version`
#   3. run a container on A that counts into its log and, on TCP port 9000, into
#      a connection
#   4. ps, inspect, logs, exec
#   5. kill -9 ferryd: the container keeps counting; restart ferryd, it reattaches
#   6. start ferryd on B and wire the two bridges into one segment (a veth pair)
#   7. a client in a third namespace C on A's bridge connects to port 9000
#   8. `ferryctl migrate` the container from A to B, live: progress and figures
#   9. the container runs on B with the same address, still counting; A has
#      nothing; the client's connection carries on, in sequence
#  10. stop and rm it on B, SIGTERM both ferryd, check that nothing is left
#
# Usage: scripts/demo.sh [BIN_DIR]   (default: the repo's bin/)
#
# Everything the demo creates lives in one mktemp -d directory, two cgroup
# parents and three network namespaces; the EXIT trap removes all of it, also
# when a step fails or the script is interrupted. Exit status 0 and a final
# "demo: OK" line only when every step passed and nothing was left behind.
set -euo pipefail
export LC_ALL=C # one decimal point for $EPOCHREALTIME, awk and printf

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${1:-$REPO/bin}

TMP=""              # temp dir holding both hosts' state, the PKI and the client's files
CTL_TIMEOUT=30      # seconds any single ferryctl call may take
PORT=7443           # the ferryd listeners' port (mutual TLS)
SUBNET=10.88.0.0/24 # the segment both hosts share

# Per host (a, b): state, run dir, socket, log, bpf root, cgroup parent, network
# namespace, node name, address range, bridge gateway (= --listen address), the
# folder of its certificate, and the pid of the ferryd we started (if running).
declare -A ROOT RUN SOCK LOG BPF CGP NETNS NODE RANGE GW TLS FPID
CGP[a]=/ferry-demo-$$ CGP[b]=/ferry-demo-$$-b
NETNS[a]=ferry-demo-$$-a NETNS[b]=ferry-demo-$$-b
NODE[a]=host-a NODE[b]=host-b
RANGE[a]=10.88.0.0/26 RANGE[b]=10.88.0.64/26
GW[a]=10.88.0.1 GW[b]=10.88.0.64
FPID[a]="" FPID[b]=""
NS_C=ferry-demo-$$-c      # the client's namespace, on A's bridge
CLIENT_ADDR=10.88.0.200/24
WIRE_A=fdw$$a WIRE_B=fdw$$b # the wire between the bridges: its end in A, its end in B
CL_C=fdc$$c CL_A=fdc$$a     # the client's veth: its end in C, its end on A's bridge
CLIENT_PID=""               # the client's nc, while it runs
STAMP_PID=""                # the loop that stamps each line the client receives with its arrival time
T0=$SECONDS
# The script's own stdout and stderr, for the traps and the cleanup: a signal
# may arrive while a step has either redirected (e.g. muted while reaping ferryd).
exec 8>&1 9>&2

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

# ctl HOST ARGS...: ferryctl against that host's ferryd (bounded), quietly.
ctl() {
	local h=$1
	shift
	timeout "$CTL_TIMEOUT" "$BIN/ferryctl" --socket "${SOCK[$h]}" "$@"
}

# show HOST ARGS...: echo a ferryctl command ($A and $B stand for the sockets), then run it.
show() {
	local h=$1
	shift
	printf '$ ferryctl --socket $%s %s\n' "${h^^}" "$(quote "$@")"
	ctl "$h" "$@"
}

# x CMD...: echo a command, then run it.
x() {
	printf '$ %s\n' "$(quote "$@")"
	"$@"
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

# cmdline_of PID: a process's command line, space-separated.
cmdline_of() { { tr '\0' ' ' <"/proc/$1/cmdline"; } 2>/dev/null | sed 's/ $//'; }

# ferry_procs [HOST]: ferryd processes (daemon or `ferryd monitor`) of this demo
# (of one host), i.e. whose command line names the temp dir (the host's dir).
ferry_procs() {
	local f pid dir=$TMP
	[[ -n $TMP ]] || return 0
	[[ -n ${1:-} ]] && dir=$TMP/$1/
	for f in $(grep -laF -- "$dir" /proc/[0-9]*/cmdline 2>/dev/null); do
		pid=${f#/proc/}; pid=${pid%/cmdline}
		[[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
		[[ $(cmdline_of "$pid") == *ferryd* ]] && printf '%s\n' "$pid"
	done
	return 0
}

# monitors HOST: the `ferryd monitor` processes of that host.
monitors() {
	local pid
	for pid in $(ferry_procs "$1"); do
		[[ " $(cmdline_of "$pid") " == *" monitor "* ]] && printf '%s\n' "$pid"
	done
	return 0
}

# tmp_users: processes (other than this shell) with their working directory or
# an open file under the temp dir: a ferryd, monitor, CRIU or client we lost
# track of. fd 3 (the client's stdin fifo) is closed while it looks.
tmp_users() {
	[[ -n $TMP ]] || return 0
	find /proc/[0-9]*/cwd /proc/[0-9]*/fd -maxdepth 1 -lname "$TMP/*" 2>/dev/null |
		cut -d/ -f3 | sort -un | grep -vx -e "$$" -e "$BASHPID" || true
} 3>&-

# mounts_under DIR: mount points at or below DIR, deepest first.
mounts_under() {
	[[ -n $1 ]] || return 0
	awk -v d="$1" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r
}

# cgroup_dirs PARENT [MINDEPTH]: directories of a cgroup parent in every hierarchy, children first.
cgroup_dirs() {
	local h
	for h in /sys/fs/cgroup/*/; do
		[[ -d $h${1#/} ]] && find "$h${1#/}" -mindepth "${2:-0}" -depth -type d
	done
	return 0
}

# last_count HOST: the highest "count N" the counter wrote to its log file on that host.
last_count() {
	local f=${ROOT[$1]}/containers/counter/container.log
	{ grep -a '^count [0-9]*$' "$f" 2>/dev/null || true; } | tail -n 1 | sed 's/^count //'
}

# wait_count_above HOST N SECONDS: wait until the log holds a count above N.
wait_count_above() {
	local i c
	for ((i = 0; i < $3 * 10; i++)); do
		c=$(last_count "$1")
		[[ -n $c && $c -gt $2 ]] && return 0
		sleep 0.1
	done
	die "the counter's log on ${1^^} did not pass count $2 within $3 s"
}

# logs_count HOST: the last count `ferryctl logs counter` shows.
logs_count() {
	{ ctl "$1" logs counter || true; } | { grep -a '^count [0-9]*$' || true; } | tail -n 1 | sed 's/^count //'
}

# inspect_field HOST NAME KEY: a top-level number or string field of `ferryctl inspect NAME`.
inspect_field() {
	{ ctl "$1" inspect "$2" || true; } | sed -n "s/^  \"$3\": *\"\{0,1\}\([^\",]*\)\"\{0,1\},\{0,1\}\$/\1/p" | head -n 1
}

# wait_up NETNS LINK: wait (5 s at most) until the link's operational state is UP.
wait_up() {
	local i
	for ((i = 0; i < 50; i++)); do
		[[ $(ip -n "$1" -br link show "$2" 2>/dev/null) == *" UP "* ]] && return 0
		sleep 0.1
	done
	die "$2 in namespace $1 is not UP within 5 s: $(ip -n "$1" -br link show "$2" 2>&1)"
}

# client_lines: the complete lines the client has received so far, each
# "ARRIVAL_TIME LINE".
client_lines() {
	local f=$TMP/client.out s=$TMP/client.snap
	cp "$f" "$s"
	if [[ -s $s && -n $(tail -c 1 "$s") ]]; then sed '$d' "$s"; else cat "$s"; fi
}

# client_ticks: how many "tick N" lines the client has received.
client_ticks() { client_lines | grep -c ' tick [0-9]*$' || true; }

# client_show N: the last N lines the client received, with their arrival
# time in seconds since it connected.
client_show() {
	client_lines | tail -n "$1" | awk -v t0="$CLIENT_T0" '{ printf "    | %7.3f s  %s %s\n", $1 - t0, $2, $3 }'
}

# stamp: copy lines from stdin to stdout, each prefixed with its arrival time.
stamp() {
	local l
	while IFS= read -r l; do printf '%s %s\n' "$EPOCHREALTIME" "$l"; done
}

# wait_client_ticks N SECONDS: wait until the client has received N ticks.
wait_client_ticks() {
	local i
	for ((i = 0; i < $2 * 10; i++)); do
		(($(client_ticks) >= $1)) && return 0
		pid_alive "$CLIENT_PID" || die "the client's nc exited (connection closed?): $(cat "$TMP/client.err" 2>/dev/null)"
		sleep 0.1
	done
	die "the client received $(client_ticks) ticks within $2 s, want $1"
}

# client_conn: the client's TCP connection to port 9000 as ss shows it (local and peer address).
client_conn() {
	ss -N "$NS_C" -Htn state established "( dport = :9000 )" 2>/dev/null | awk '{ print $(NF-1), "->", $NF }'
}

start_ferryd() {
	local h=$1 ns=${NETNS[$1]}
	# --pressure-source parent: the harden/relax detector watches the containers'
	# own PSI; this machine is shared, and host-wide CPU pressure from others'
	# work would harden the demo's nodes for reasons it cannot show.
	local args=(--root "${ROOT[$h]}" --run-dir "${RUN[$h]}" --socket "${SOCK[$h]}" --cgroup-parent "${CGP[$h]}"
		--bpf-root "${BPF[$h]}" --pressure-source parent --node-name "${NODE[$h]}"
		--subnet "$SUBNET" --ip-range "${RANGE[$h]}" --listen "${GW[$h]}:$PORT" --tls-dir "${TLS[$h]}")
	if [[ ! -e /run/netns/$ns ]]; then
		x ip netns add "$ns"
		# A real host has lo up (CRIU's probes bind to 127.0.0.1).
		x ip -n "$ns" link set lo up
	fi
	printf '$ nsenter --net=/run/netns/%s ferryd %s >>%s 2>&1 &\n' "$ns" "$(quote "${args[@]}")" "${LOG[$h]}"
	# Its own session, so a Ctrl-C in the terminal reaches only this script,
	# whose cleanup still needs a running ferryd to remove the containers.
	if command -v setsid >/dev/null; then
		setsid nsenter --net=/run/netns/"$ns" "$BIN/ferryd" "${args[@]}" >>"${LOG[$h]}" 2>&1 </dev/null 3>&- 8>&- 9>&- &
	else
		nsenter --net=/run/netns/"$ns" "$BIN/ferryd" "${args[@]}" >>"${LOG[$h]}" 2>&1 </dev/null 3>&- 8>&- 9>&- &
	fi
	FPID[$h]=$!
	local i
	for ((i = 0; i < 100; i++)); do # 10 s
		if ! pid_alive "${FPID[$h]}"; then
			FPID[$h]=""
			tail -n 20 "${LOG[$h]}" | sed 's/^/    ferryd: /' >&2
			die "ferryd on ${h^^} exited during startup (log above)"
		fi
		if ctl "$h" version >/dev/null 2>&1; then
			note "ferryd ${NODE[$h]} (pid ${FPID[$h]}) answers on \$${h^^} and listens on ${GW[$h]}:$PORT"
			return 0
		fi
		sleep 0.1
	done
	die "ferryd on ${h^^} did not answer on ${SOCK[$h]} within 10 s"
}

# stop_ferryd HOST SIGNAL SECONDS: signal that ferryd and wait for it; returns its exit status.
# (stderr is muted while it is reaped: bash would report "Killed" for kill -9.)
stop_ferryd() {
	local h=$1 pid=${FPID[$1]} rc=0 gone=1
	[[ -n $pid ]] || return 0
	{
		kill "-$2" "$pid" || true
		if ! wait_gone "$pid" "$3"; then
			gone=0
			kill -KILL "$pid" || true
		fi
		wait "$pid" || rc=$?
	} 2>/dev/null
	FPID[$h]=""
	if ((gone == 0)); then
		printf 'demo: ferryd on %s did not exit within %s s of SIG%s; killed it\n' "${h^^}" "$3" "$2" >&2
		return 1
	fi
	return "$rc"
}

# stop_client: end the client's nc and its stamping loop (if they run), and
# close our end of its stdin.
stop_client() {
	local pid
	for pid in "$CLIENT_PID" "$STAMP_PID"; do
		[[ -n $pid ]] || continue
		{
			kill -KILL "$pid" || true
			wait "$pid" || true
		} 2>/dev/null
	done
	CLIENT_PID="" STAMP_PID=""
	exec 3>&-
}

# ------------------------------------------------------------------ cleanup
cleanup() {
	local rc=$? h pid d m i names left=()
	exec 1>&8 2>&9
	trap - EXIT
	trap '' INT TERM HUP # every wait below is bounded; do not leave half a cleanup
	set +e
	CTL_TIMEOUT=15
	[[ -z $TMP ]] && { ((rc == 0)) || printf 'demo: FAILED (exit %d)\n' "$rc" >&2; exit "$rc"; }
	if ((rc != 0)); then
		printf '\n==> cleanup after a failure (exit %d)\n' "$rc"
		for h in a b; do
			if [[ -s ${LOG[$h]} ]]; then
				note "last lines of ferryd's log on ${h^^}:"
				tail -n 12 "${LOG[$h]}" | sed 's/^/    | /'
			fi
		done
	else
		banner "cleanup"
	fi
	stop_client
	# Containers first, through each ferryd while it is up.
	for h in a b; do
		if [[ -n ${FPID[$h]} ]] && ! pid_alive "${FPID[$h]}"; then
			note "ferryd on ${h^^} (pid ${FPID[$h]}) is not running; removing by hand"
		elif [[ -n ${FPID[$h]} ]]; then
			if names=$(ctl "$h" ps -o json 2>&1); then
				for d in $(printf '%s\n' "$names" | grep -o '"name": *"[^"]*"' | sed 's/.*"\([^"]*\)"$/\1/'); do
					note "removing container $d on ${h^^}: ferryctl --socket \$${h^^} rm -f $d"
					ctl "$h" rm -f "$d" >/dev/null 2>&1 || note "ferryctl rm -f $d failed"
				done
			else
				note "ferryd on ${h^^} (pid ${FPID[$h]}) does not answer ($names); removing by hand"
			fi
		fi
	done
	for h in a b; do
		[[ -n ${FPID[$h]} ]] && { stop_ferryd "$h" TERM 10 || true; }
	done
	# Whatever ferryd did not remove: monitors (and a ferryd, CRIU or client we
	# lost track of), then the processes left in our cgroups.
	for pid in $(ferry_procs) $(tmp_users); do
		pid_alive "$pid" || continue
		note "killing leftover process $pid: $(cmdline_of "$pid")"
		kill -KILL "$pid" 2>/dev/null
	done
	for pid in $(for d in $(cgroup_dirs "${CGP[a]}") $(cgroup_dirs "${CGP[b]}"); do cat "$d/cgroup.procs"; done 2>/dev/null | sort -un); do
		note "killing leftover process $pid in our cgroups: $(cmdline_of "$pid" | head -c 60)"
		kill -KILL "$pid" 2>/dev/null
	done
	for m in $(mounts_under "$TMP"); do
		note "unmounting $m"
		umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || note "umount $m failed"
	done
	for ((i = 0; i < 50; i++)); do # 5 s: killed tasks take a moment to leave their cgroups
		for d in $(cgroup_dirs "${CGP[a]}") $(cgroup_dirs "${CGP[b]}"); do rmdir "$d" 2>/dev/null; done
		[[ -z $(cgroup_dirs "${CGP[a]}")$(cgroup_dirs "${CGP[b]}") ]] && break
		sleep 0.1
	done
	# Deleting a namespace deletes the veth ends in it (and so both pairs).
	for d in "$NS_C" "${NETNS[b]}" "${NETNS[a]}"; do
		if [[ -e /run/netns/$d ]]; then
			ip netns del "$d" 2>/dev/null || note "ip netns del $d failed"
		fi
	done
	for d in "$WIRE_A" "$WIRE_B" "$CL_C" "$CL_A"; do # only if a step failed between add and move
		ip link show "$d" >/dev/null 2>&1 && { ip link del "$d" 2>/dev/null || note "ip link del $d failed"; }
	done
	# Never rm -rf across a mount point.
	if [[ -z $(mounts_under "$TMP") ]]; then
		rm -rf -- "$TMP"
	fi

	# What is left?
	for d in $(cgroup_dirs "${CGP[a]}") $(cgroup_dirs "${CGP[b]}"); do left+=("cgroup $d"); done
	for m in $(mounts_under "$TMP"); do left+=("mount $m"); done
	for pid in $(ferry_procs) $(tmp_users); do
		pid_alive "$pid" && left+=("process $pid: $(cmdline_of "$pid")")
	done
	[[ -e $TMP ]] && left+=("directory $TMP")
	for d in "${NETNS[a]}" "${NETNS[b]}" "$NS_C"; do
		[[ -e /run/netns/$d ]] && left+=("network namespace $d")
	done
	for d in "$WIRE_A" "$WIRE_B" "$CL_C" "$CL_A"; do
		ip link show "$d" >/dev/null 2>&1 && left+=("link $d")
	done
	if ((${#left[@]} > 0)); then
		printf 'demo: left on the host:\n' >&2
		printf '    %s\n' "${left[@]}" >&2
		((rc == 0)) && rc=1
	else
		note "removed $TMP, cgroup parents ${CGP[a]} and ${CGP[b]}, namespaces ${NETNS[a]}, ${NETNS[b]} and $NS_C:"
		note "nothing left (no cgroups, mounts, processes, namespaces, links or files)"
	fi
	if ((rc == 0)); then
		printf '\ndemo: OK (%d s)\n' $((SECONDS - T0))
	else
		printf '\ndemo: FAILED (exit %d)\n' "$rc" >&2
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'printf "\ndemo: interrupted (SIGINT)\n" >&9; exit 130' INT
trap 'printf "\ndemo: terminated (SIGTERM)\n" >&9; exit 143' TERM
trap 'exit 129' HUP

# ------------------------------------------------------------------ preflight
[[ $(id -u) -eq 0 ]] || die "run as root (ferryd creates cgroups, mounts and namespaces)"
for b in ferryd ferryctl; do
	[[ -x $BIN/$b ]] || die "$BIN/$b not found or not executable (build with: make build)"
done
BIN=$(cd "$BIN" && pwd)
for b in timeout nsenter ip ss mkfifo; do
	command -v "$b" >/dev/null || die "$b is required"
done
ROOTFS=$("$BIN/ferryd" --help 2>&1 | sed -n 's/.*--default-rootfs .*(default "\([^"]*\)").*/\1/p')
ROOTFS=${ROOTFS:-/opt/ferry/rootfs/busybox}
[[ -e $ROOTFS/bin/sh ]] || die "the default rootfs $ROOTFS is missing (install it with: make deps)"
BUSYBOX=$ROOTFS/bin/busybox # the client's nc
[[ -x $BUSYBOX ]] || die "$BUSYBOX is missing (install it with: make deps)"
for d in "${NETNS[a]}" "${NETNS[b]}" "$NS_C"; do
	[[ ! -e /run/netns/$d ]] || die "network namespace $d exists already"
done

# ------------------------------------------------------------------ 1. setup
banner "1/10 two private hosts, A and B: temporary state, cgroup parents, certificates"
TMP=$(mktemp -d /tmp/ferry-demo.XXXXXX)
for h in a b; do
	ROOT[$h]=$TMP/$h/root RUN[$h]=$TMP/$h/run SOCK[$h]=$TMP/$h/run/ferryd.sock
	LOG[$h]=$TMP/$h/ferryd.log BPF[$h]=$TMP/$h/bpffs/ferry TLS[$h]=$TMP/pki/${NODE[$h]}
	mkdir -p "$TMP/$h"
done
note "binaries:       $BIN"
note "default rootfs: $ROOTFS"
for h in a b; do
	note "host ${h^^}: node ${NODE[$h]} in network namespace ${NETNS[$h]}, cgroup parent ${CGP[$h]}"
	note "        addresses from ${RANGE[$h]} of $SUBNET, bridge ferry0 at ${GW[$h]}, listens on ${GW[$h]}:$PORT"
	note "        state $TMP/$h/{root,run,bpffs}, log ${LOG[$h]}"
	note "        socket \$${h^^}=${SOCK[$h]}"
done
CERTS=(certs "$TMP/pki" --node "${NODE[a]}=${GW[a]}" --node "${NODE[b]}=${GW[b]}")
printf '$ ferryctl %s\n' "$(quote "${CERTS[@]}")"
"$BIN/ferryctl" "${CERTS[@]}"
[[ -s ${TLS[a]}/node.pem && -s ${TLS[b]}/node.pem ]] || die "ferryctl certs made no node certificates in $TMP/pki"

# ------------------------------------------------------------------ 2. start A
banner "2/10 start ferryd on A"
start_ferryd a
show a version

# ------------------------------------------------------------------ 3. run
banner "3/10 run a counting container on A: into its log, and on TCP port 9000 into a connection"
COUNTER='(i=0; while true; do i=$((i+1)); echo "count $i"; sleep 0.5; done) & j=0; while true; do j=$((j+1)); echo "tick $j"; sleep 0.1; done | nc -l -p 9000'
show a run counter --mem-guarantee 32M --mem-limit 64M --cpu-guarantee 0.25 --cpu-limit 0.5 -- sh -c "$COUNTER"

# ------------------------------------------------------------------ 4. look at it
banner "4/10 look at it: ps, inspect, logs, exec"
show a ps
show a inspect counter
INIT_PID=$(inspect_field a counter pid)
[[ $INIT_PID =~ ^[0-9]+$ && $INIT_PID -gt 0 ]] || die "no init pid in 'ferryctl inspect counter'"
note "the container's init runs as host pid $INIT_PID; its cgroup: $(inspect_field a counter cgroup)"
note "memory limit in the kernel: $(cat "/sys/fs/cgroup/memory${CGP[a]}/counter/memory.limit_in_bytes" 2>/dev/null || echo '?') bytes," \
	"cpu quota: $(cat "/sys/fs/cgroup/cpu${CGP[a]}/counter/cpu.cfs_quota_us" 2>/dev/null || echo '?')/$(cat "/sys/fs/cgroup/cpu${CGP[a]}/counter/cpu.cfs_period_us" 2>/dev/null || echo '?') us"
wait_count_above a 3 10
echo '$ ferryctl --socket $A logs counter | tail -n 3'
ctl a logs counter | tail -n 3
show a exec counter -- hostname
show a exec counter -- ip -4 -o addr show eth0
show a exec counter -- sh -c 'grep CapEff /proc/1/status; ps'

# ------------------------------------------------------------------ 5. crash ferryd
banner "5/10 kill -9 ferryd on A: the container keeps running; restart ferryd and it reattaches"
printf '$ kill -9 %s    # ferryd on A\n' "${FPID[a]}"
stop_ferryd a KILL 10 || true # exit status 137 is the point
pid_alive "$INIT_PID" || die "the container's init (pid $INIT_PID) died with ferryd"
note "ferryd is gone; the container's init (pid $INIT_PID) is alive: $(cmdline_of "$INIT_PID" | head -c 60)..."
note "its monitor (ferryd monitor, own session) is alive too: pid $(monitors a | paste -sd ' ')"
c1=$(last_count a)
sleep 2
c2=$(last_count a)
note "log file ${ROOT[a]}/containers/counter/container.log: count $c1, 2 s later count $c2"
[[ -n $c1 && -n $c2 && $c2 -gt $c1 ]] || die "the container's log did not grow while ferryd was down"
start_ferryd a
show a ps
PID2=$(inspect_field a counter pid)
STATE2=$(inspect_field a counter state)
[[ $STATE2 == running && $PID2 == "$INIT_PID" ]] ||
	die "after the restart: counter is $STATE2 with pid $PID2, want running with pid $INIT_PID"
note "ferryd reattached: counter is $STATE2, same init pid $PID2"
wait_count_above a "$c2" 10
echo '$ ferryctl --socket $A logs counter | tail -n 3'
ctl a logs counter | tail -n 3
c3=$(logs_count a)
[[ -n $c3 && $c3 -gt $c2 ]] || die "ferryctl logs shows count ${c3:-none}, want more than $c2"
note "still counting: $c2 while ferryd was down, $c3 now"

# ------------------------------------------------------------------ 6. host B and the wire
banner "6/10 a second host B, and a wire between the bridges of A and B"
start_ferryd b
show b version
# Both bridges exist now: join them with a veth pair, one end in each namespace.
x ip link add "$WIRE_A" netns "${NETNS[a]}" type veth peer name "$WIRE_B" netns "${NETNS[b]}"
x ip -n "${NETNS[a]}" link set "$WIRE_A" master ferry0 up
x ip -n "${NETNS[b]}" link set "$WIRE_B" master ferry0 up
wait_up "${NETNS[a]}" "$WIRE_A"
wait_up "${NETNS[b]}" "$WIRE_B"
note "A: $(ip -n "${NETNS[a]}" -br link show "$WIRE_A" | tr -s ' ')"
note "B: $(ip -n "${NETNS[b]}" -br link show "$WIRE_B" | tr -s ' ')"
ok=0
for i in 1 2 3 4 5; do
	if nsenter --net=/run/netns/"${NETNS[a]}" "$BUSYBOX" ping -c 1 -W 1 "${GW[b]}" >/dev/null 2>&1; then ok=1; break; fi
done
((ok)) || die "A (${GW[a]}) does not reach B (${GW[b]}) over the wire"
note "one segment: A (${GW[a]}) reaches B (${GW[b]}) over the wire"

# ------------------------------------------------------------------ 7. the client
banner "7/10 a client in namespace C on A's bridge connects to the container's port 9000"
IP=$(inspect_field a counter ip)
MAC=$(inspect_field a counter mac)
[[ $IP == 10.88.0.* && -n $MAC ]] || die "no address in 'ferryctl inspect counter' (ip '$IP', mac '$MAC')"
x ip netns add "$NS_C"
x ip link add "$CL_C" netns "$NS_C" type veth peer name "$CL_A" netns "${NETNS[a]}"
x ip -n "${NETNS[a]}" link set "$CL_A" master ferry0 up
x ip -n "$NS_C" addr add "$CLIENT_ADDR" dev "$CL_C"
x ip -n "$NS_C" link set "$CL_C" up
ip -n "$NS_C" link set lo up
wait_up "$NS_C" "$CL_C"
wait_up "${NETNS[a]}" "$CL_A"
# The client's stdin stays open (a fifo we hold open on fd 3): at EOF nc would
# half-close the connection and the server's nc would end. What it receives
# goes through a second fifo to a loop that notes each line's arrival time.
mkfifo "$TMP/client.in" "$TMP/client.pipe"
exec 3<>"$TMP/client.in"
stamp <"$TMP/client.pipe" >"$TMP/client.out" 3>&- 8>&- 9>&- &
STAMP_PID=$!
CLIENT_T0=$EPOCHREALTIME
printf '$ nsenter --net=/run/netns/%s busybox nc %s 9000 <%s >%s &\n' "$NS_C" "$IP" "$TMP/client.in" "$TMP/client.pipe"
nsenter --net=/run/netns/"$NS_C" "$BUSYBOX" nc "$IP" 9000 <"$TMP/client.in" >"$TMP/client.pipe" 2>"$TMP/client.err" 3>&- 8>&- 9>&- &
CLIENT_PID=$!
wait_client_ticks 10 10
CONN=$(client_conn)
[[ -n $CONN ]] || die "ss shows no established connection to port 9000 in $NS_C"
note "connected: $CONN (client nc pid $CLIENT_PID)"
note "the client has received $(client_ticks) ticks (those sent before it connected waited in the pipe); the latest,"
note "with their arrival in seconds since the client started:"
client_show 3

# ------------------------------------------------------------------ 8. migrate
banner "8/10 migrate the container from A to B, live"
COUNT_BEFORE=$(last_count a)
TICKS_BEFORE=$(client_ticks)
note "before: on A at $IP ($MAC), init pid $INIT_PID, count $COUNT_BEFORE; the client has $TICKS_BEFORE ticks"
t_mig=${EPOCHREALTIME/./}
show a migrate counter --to "${GW[b]}:$PORT" || die "ferryctl migrate failed"
note "ferryctl migrate took $(((${EPOCHREALTIME/./} - t_mig) / 1000)) ms (wall clock)"
TICKS_AT=$(client_ticks)

# ------------------------------------------------------------------ 9. after
banner "9/10 after the migration: the container runs on B, same address, still counting"
show b ps
show b inspect counter
STATE_B=$(inspect_field b counter state)
IP_B=$(inspect_field b counter ip)
MAC_B=$(inspect_field b counter mac)
PID_B=$(inspect_field b counter pid)
[[ $STATE_B == running ]] || die "counter on B is '$STATE_B', want running"
[[ $IP_B == "$IP" && $MAC_B == "$MAC" ]] || die "counter on B has $IP_B ($MAC_B), want $IP ($MAC) as on A"
note "on B: $STATE_B, same address $IP_B and MAC $MAC_B; init now host pid $PID_B"
pid_alive "$INIT_PID" && die "A's copy (init pid $INIT_PID) is still alive"
note "A's copy is gone (init pid $INIT_PID no longer exists)"
wait_count_above b "$COUNT_BEFORE" 10
echo '$ ferryctl --socket $B logs counter | tail -n 3'
ctl b logs counter | tail -n 3
COUNT_AFTER=$(logs_count b)
[[ -n $COUNT_AFTER && $COUNT_AFTER -gt $COUNT_BEFORE ]] || die "ferryctl logs on B shows count ${COUNT_AFTER:-none}, want more than $COUNT_BEFORE"
ctl b logs counter | grep -x 'count 1' >/dev/null || die "the log on B lacks the counts from before the migration"
note "the counter went on: count $COUNT_BEFORE on A before, $COUNT_AFTER on B now (the log came along, from count 1)"
show a ps
[[ $(ctl a ps -o json | tr -d ' \n') == '[]' ]] || die "A still lists containers after the migration"
[[ ! -e ${ROOT[a]}/containers/counter ]] || die "A still has ${ROOT[a]}/containers/counter"
show a migrations
# The client: the same connection goes on, in sequence.
wait_client_ticks $((TICKS_AT + 20)) 10
pid_alive "$CLIENT_PID" || die "the client's nc exited"
CONN2=$(client_conn)
[[ $CONN2 == "$CONN" ]] || die "the client's connection is '$CONN2' now, was '$CONN'"
note "the last lines the client received, with their arrival in seconds since it started:"
client_show 5
# Every line a tick, from tick 1 on, each one more than the one before.
client_lines >"$TMP/client.check"
SEQ=$(awk '
	!/^[0-9.]+ tick [0-9]+$/ { printf "unexpected line %d: %s\n", NR, $0; bad = 1; exit }
	{ n = $3 + 0 }
	cnt == 0 && n != 1 { printf "the first tick is %d, want 1\n", n; bad = 1; exit }
	cnt > 0 && n != prev + 1 { printf "tick %d after tick %d (line %d)\n", n, prev, NR; bad = 1; exit }
	cnt > 0 && $1 - t > gap { gap = $1 - t; at = n }
	{ prev = n; t = $1; cnt++ }
	END { if (!bad) printf "ok %d %d %.3f %d\n", cnt, prev, gap, at }' "$TMP/client.check")
[[ $SEQ == ok\ * ]] || die "the client's ticks are out of sequence: $SEQ"
read -r _ NTICKS LASTTICK GAP GAPAT <<<"$SEQ"
note "same connection ($CONN2), same nc (pid $CLIENT_PID): ticks 1..$LASTTICK, $NTICKS lines, no gap and no reset;"
note "$TICKS_BEFORE ticks before the migration, $((NTICKS - TICKS_BEFORE)) since; the longest pause between two ticks"
note "(one every 0.1 s) was $GAP s, before tick $GAPAT: the migration as the client saw it (the summary's"
note "downtime is how long ferry kept the container frozen)"

# ------------------------------------------------------------------ 10. stop and clean up
banner "10/10 stop and remove it on B, stop both ferryd, and check that nothing is left"
show b stop counter --timeout 1s
note "counter is $(inspect_field b counter state), exit code $(inspect_field b counter exit_code)"
show b rm counter
show b ps
pid_alive "$PID_B" && die "the container's init on B (pid $PID_B) is still alive after stop and rm"
if wait_gone "$CLIENT_PID" 5; then
	note "the server's end closed, and the client's nc ended with it"
else
	note "the client's nc is still running; ending it"
fi
stop_client
rc=0
for h in a b; do
	printf '$ kill -TERM %s    # ferryd on %s\n' "${FPID[$h]}" "${h^^}"
	stop_ferryd "$h" TERM 15 || rc=$?
	((rc == 0)) || die "ferryd on ${h^^} exited with status $rc after SIGTERM"
done
note "both ferryd exited cleanly"
problems=0
for h in a b; do
	if [[ -n $(cgroup_dirs "${CGP[$h]}" 1) ]]; then
		note "LEFT on ${h^^}: cgroups under ${CGP[$h]}:" $(cgroup_dirs "${CGP[$h]}" 1)
		problems=1
	fi
	# The node's own mounts stay by design (they outlive ferryd restarts): the
	# shared mount point for container netns files and the bpffs holding the
	# sysctl guards' pins. Anything else under the host's dir is a container's leftover.
	ctr_mounts=$(mounts_under "$TMP/$h" | grep -v -x -e "${RUN[$h]}/netns" -e "$TMP/$h/bpffs" || true)
	if [[ -n $ctr_mounts ]]; then
		note "LEFT on ${h^^}: mounts:" $ctr_mounts
		problems=1
	fi
	[[ -d ${ROOT[$h]}/containers/counter ]] && { note "LEFT on ${h^^}: ${ROOT[$h]}/containers/counter"; problems=1; }
	[[ -e ${BPF[$h]}/counter ]] && { note "LEFT on ${h^^}: sysctl guard pin ${BPF[$h]}/counter"; problems=1; }
done
if [[ -n $(ferry_procs)$(tmp_users) ]]; then
	note "LEFT: processes:" $(ferry_procs) $(tmp_users)
	problems=1
fi
((problems == 0)) || die "ferry left things behind (listed above)"
note "on both hosts: no container cgroups, no container mounts, no ferryd, monitor or client processes"
note "(the empty cgroup parents, the nodes' netns mount points and bpffs, and the namespaces go in the cleanup below)"
exit 0
