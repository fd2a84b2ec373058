// Package vmtest holds the smoke tests of ferry's VM test tier
// (scripts/vm/run.sh, make test-vm): a Debian 12 kernel booted under qemu,
// because the development machines lack soft-dirty page tracking and run
// cgroup v1. They prove what the tier exists for: soft-dirty tracking works
// (the kernel's and CRIU's view), the host is a pure cgroup v2 one with the
// controllers ferry needs, CRIU pre-copy rounds really skip the pages the
// parent images hold, and ferryd runs containers with their limits on v2.
//
// The tests run only where the VM's /init sets FERRY_VM=1; anywhere else they
// skip with a message saying so (they would test the wrong kernel). Inside
// the VM they run as root with CI=true, so a missing prerequisite fails.
// They touch only what they create: a cgroup named after the test binary's
// pid, temporary directories, and the processes they start.
package vmtest
