// Package failpoint lets tests make ferryd fail at named moments. Failpoints
// exist only in binaries built with the "failpoints" build tag (the fault
// tests build such a ferryd); in every other build Check is a no-op.
//
// A test turns failpoints on with FERRY_FAILPOINTS=name[=action],... where
// action is "error" (the default: Check returns an error), "sleep" (Check
// blocks for a minute, long enough for a test to kill the process there,
// then returns an error) or "delay" (Check blocks for three seconds, then
// lets the caller go on: something else can happen meanwhile).
package failpoint
