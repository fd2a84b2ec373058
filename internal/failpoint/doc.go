// Package failpoint lets tests make ferryd fail at named moments. Failpoints
// exist only in binaries built with the "failpoints" build tag (the fault
// tests build such a ferryd); in every other build Check is a no-op.
//
// A test turns failpoints on with FERRY_FAILPOINTS=name[=action],... where
// action is "error" (the default: Check returns an error) or "sleep" (Check
// blocks for a minute, long enough for a test to kill the process there).
package failpoint
