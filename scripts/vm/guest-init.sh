#!/bin/sh
# scripts/vm/guest-init.sh - /init of ferry's VM test tier. run.sh puts it at
# /init of the initramfs; busybox sh runs it as pid 1 inside the guest.
#
# Stage 1 (on the kernel's initramfs root): moves a bind mount of that root
# onto / and chroots into it. libcontainer's pivot_root(2) refuses a root
# without a parent mount (the initramfs "rootfs"; runc's --no-pivot exists for
# that case), and the bind mount has one. Nothing is copied.
#
# Stage 2: mounts proc, sys, devtmpfs, cgroup2 (all controllers enabled at
# the root), bpffs, tmpfs on /tmp and /run; brings lo up; loads the kernel
# modules CRIU and ferry need; prints the header the host checks (kernel,
# cgroup, soft-dirty); runs each Go test binary under /ferry/tests/ with its
# -test.run regex; prints the end marker with the exit code; powers off.
#
# Every line the host parses starts with "FERRY-VM"; the BEGIN/END/EXIT
# markers carry a nonce from /ferry/vm.conf so test output cannot fake them.
# If this script dies, the kernel panics (pid 1 exited) and, with panic=-1
# and qemu's -no-reboot, the VM stops without an EXIT marker: the host fails.

# busybox ash has "local".
# shellcheck disable=SC3043

PATH=/opt/ferry/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH

uptime_s() { cut -d' ' -f1 /proc/uptime; }
uptime_int() { cut -d. -f1 /proc/uptime; }

halt_now() {
	sync
	poweroff -f
	# poweroff failed: the host's timeout is the last resort.
	echo o >/proc/sysrq-trigger
	sleep 30
}

stage1() {
	/bin/busybox mount -t devtmpfs devtmpfs /dev
	# The initramfs has no /dev/console node: open the console now.
	exec </dev/console >/dev/console 2>&1
	/bin/busybox mount -t proc proc /proc
	echo "FERRY-VM-INIT uptime=$(uptime_s)"
	mkdir -p /newroot
	if ! mount --bind / /newroot; then
		echo "FERRY-VM: stage 1: bind mount of / on /newroot failed"
		halt_now
	fi
	umount /proc
	umount -l /dev
	cd /newroot || halt_now
	if ! mount --move . /; then
		echo "FERRY-VM: stage 1: mount --move /newroot / failed"
		halt_now
	fi
	exec chroot . /init stage2
}

# ---------------------------------------------------------------- stage 2
BOOT_FAIL=""   # reasons the run fails even if every test passes

boot_fail() {
	echo "FERRY-VM: ERROR: $*"
	BOOT_FAIL="$BOOT_FAIL; $*"
}

# mnt FSTYPE TARGET [OPTIONS]
mnt() {
	mkdir -p "$2"
	mount -t "$1" ${3:+-o "$3"} "$1" "$2" || boot_fail "mount -t $1 on $2 failed"
}

mounts() {
	mnt proc /proc
	mnt sysfs /sys
	mnt devtmpfs /dev
	mnt devpts /dev/pts mode=0620,ptmxmode=0666
	mnt tmpfs /dev/shm mode=1777,nosuid,nodev
	mnt mqueue /dev/mqueue
	ln -sfn /proc/self/fd /dev/fd
	ln -sfn /proc/self/fd/0 /dev/stdin
	ln -sfn /proc/self/fd/1 /dev/stdout
	ln -sfn /proc/self/fd/2 /dev/stderr
	mnt tmpfs /tmp mode=1777
	mnt tmpfs /run mode=0755
	mkdir -p /run/netns /run/lock
	mnt cgroup2 /sys/fs/cgroup nsdelegate
	mnt bpf /sys/fs/bpf mode=0700
}

load_modules() {
	local m failed="" n=0
	# shellcheck disable=SC2013 # one module name per line, no blanks in names
	for m in $(cat /etc/ferry-vm/modules.boot); do
		if modprobe "$m"; then
			n=$((n + 1))
		else
			failed="$failed $m"
		fi
	done
	echo "FERRY-VM-INFO modules_loaded=$n"
	[ -z "$failed" ] || boot_fail "modprobe failed for:$failed"
}

enable_controllers() {
	local c want=""
	# shellcheck disable=SC2013 # one line of space-separated names
	for c in $(cat /sys/fs/cgroup/cgroup.controllers); do
		want="$want +$c"
	done
	# One write per controller, so one the kernel refuses does not hide the rest.
	for c in $want; do
		echo "$c" >/sys/fs/cgroup/cgroup.subtree_control || boot_fail "cgroup2: enabling $c in the root's subtree_control failed"
	done
}

header() {
	local fstype dirty out
	# busybox stat does not name cgroup2's magic; the mount table does.
	fstype=$(awk '$2 == "/sys/fs/cgroup" { t = $3 } END { print t }' /proc/mounts)
	echo "FERRY-VM-INFO kernel=$(uname -r) version=\"$(uname -v)\""
	echo "FERRY-VM-INFO cgroup_fs=$fstype"
	echo "FERRY-VM-INFO cgroup_controllers=\"$(cat /sys/fs/cgroup/cgroup.controllers 2>/dev/null)\""
	echo "FERRY-VM-INFO cgroup_subtree_control=\"$(cat /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null)\""
	if out=$(timeout 60 criu check --feature mem_dirty_track 2>&1); then dirty=on; else dirty=off; fi
	echo "FERRY-VM-INFO softdirty=$dirty criu_check=\"$(echo "$out" | tr '\n' ' ' | sed 's/ *$//')\""
	echo "FERRY-VM-INFO criu=\"$(timeout 60 criu --version 2>&1 | tr '\n' ' ' | sed 's/ *$//')\""
	echo "FERRY-VM-INFO cpus=$(nproc) mem_mib=$(awk '/^MemTotal:/{print int($2/1024)}' /proc/meminfo)"
	echo "FERRY-VM-INFO cmdline=\"$(cat /proc/cmdline)\""
	echo "FERRY-VM-INFO setup_done_uptime=$(uptime_s)"
}

run_tests() {
	local d name re left rc t0 t1 overall=0
	for d in /ferry/tests/*/; do
		d=${d%/}
		name=${d##*/}
		re=$(cat "$d/run")
		# The host's clock started a few seconds before the kernel's (qemu,
		# firmware, decompression): leave it 30 s.
		left=$((FERRY_VM_BUDGET - $(uptime_int) - 30))
		if [ "$left" -lt 30 ]; then
			echo "FERRY-VM-END $FERRY_VM_NONCE $name exit=124 seconds=0 reason=no-time-left"
			overall=1
			continue
		fi
		echo "FERRY-VM-BEGIN $FERRY_VM_NONCE $name run=$re timeout=${left}s"
		t0=$(uptime_s)
		# -test.timeout makes a hung test panic with every goroutine's stack;
		# the SIGKILL after it is for a binary that does not even do that.
		set -- -test.v -test.count=1 -test.timeout "$((left - 10))s" -test.run "$re"
		if [ -f "$d/bench" ]; then
			set -- "$@" -test.bench "$(cat "$d/bench")" -test.benchtime 1x
		fi
		(cd "$d" &&
			exec timeout -s KILL "$left" env FERRY_BIN=/ferry/bin CI=true FERRY_VM=1 \
				TMPDIR=/tmp HOME=/root "$d/test" "$@") 2>&1
		rc=$?
		t1=$(uptime_s)
		echo
		echo "FERRY-VM-END $FERRY_VM_NONCE $name exit=$rc seconds=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}')"
		[ "$rc" -eq 0 ] || overall=1
	done
	return $overall
}

# watchdog: shortly before the host's --timeout, show what the guest is
# doing (processes, blocked tasks, every CPU's backtrace), so that a hang
# that beat the per-binary timeouts leaves evidence in the serial log.
watchdog() {
	sleep $((FERRY_VM_BUDGET - $(uptime_int) - 20))
	echo
	echo "FERRY-VM: watchdog: the time budget is nearly spent; processes, blocked tasks and CPUs follow"
	ps -o pid,ppid,stat,rss,args
	dmesg -n 8
	echo w >/proc/sysrq-trigger
	echo l >/proc/sysrq-trigger
}

stage2() {
	# shellcheck source=/dev/null
	. /ferry/vm.conf
	mounts
	hostname ferry-vm
	ip link set lo up || boot_fail "ip link set lo up failed"
	# From here on only emergencies and alerts (panics, oopses) reach the
	# console, so kernel lines do not split the test output; the warnings
	# are printed after the tests. ferry.loglevel=N on the kernel command
	# line (run.sh --append) lets more through, for debugging.
	local lvl
	lvl=$(sed -n 's/.*ferry\.loglevel=\([0-9]\).*/\1/p' /proc/cmdline)
	dmesg -n "${lvl:-2}"
	load_modules
	enable_controllers
	header
	watchdog &
	local rc=0 wd=$!
	run_tests || rc=1
	kill "$wd" 2>/dev/null
	echo "FERRY-VM: kernel messages of level warning and above (last 60):"
	dmesg -r | awk '/^<[0-4]>/' | tail -n 60 | sed 's/^/  dmesg: /'
	if [ -n "$BOOT_FAIL" ]; then
		echo "FERRY-VM: the VM setup had errors${BOOT_FAIL}"
		rc=1
	fi
	echo "FERRY-VM-EXIT=$rc $FERRY_VM_NONCE uptime=$(uptime_s)"
	halt_now
}

case "${1:-}" in
stage2) stage2 ;;
*) stage1 ;;
esac
