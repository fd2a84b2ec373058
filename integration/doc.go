// Package integration holds ferry's end-to-end tests: real ferryd and
// ferryctl binaries, real containers, cgroups, mounts and namespaces. They
// need root; under CI=true a missing prerequisite fails instead of skipping.
//
// The binaries come from $FERRY_BIN (make test-integration sets it) or are
// built into a temporary directory.
package integration
