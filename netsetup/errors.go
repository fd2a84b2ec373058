package netsetup

import (
	"errors"
	"strings"
)

// Error classes. Every error this package returns for one of these reasons
// wraps the class, so callers map them with errors.Is (to InvalidArgument,
// AlreadyExists, ResourceExhausted, NotFound).
var (
	// ErrInvalid: bad input, such as a malformed id, an address outside the
	// subnet, or an inconsistent configuration.
	ErrInvalid = errors.New("invalid argument")
	// ErrInUse: the address, the container id or a link name is already
	// taken.
	ErrInUse = errors.New("already in use")
	// ErrExhausted: the node's ip-range has no free address left.
	ErrExhausted = errors.New("address range exhausted")
	// ErrNotFound: no endpoint for that container id.
	ErrNotFound = errors.New("not found")
)

// OpError is a failed kernel or file-system operation, with the inputs it
// was given. Empty fields are left out of the message.
type OpError struct {
	Op    string // what was attempted, e.g. "create veth"
	ID    string // container id
	Link  string // link name
	Netns string // netns path
	Addr  string // address
	Err   error
}

func (e *OpError) Error() string {
	var b strings.Builder
	b.WriteString("netsetup: ")
	b.WriteString(e.Op)
	for _, f := range [...]struct{ k, v string }{{"container", e.ID}, {"link", e.Link}, {"netns", e.Netns}, {"addr", e.Addr}} {
		if f.v != "" {
			b.WriteString(" " + f.k + " " + quoteIfNeeded(f.v))
		}
	}
	if e.Err != nil {
		b.WriteString(": ")
		b.WriteString(e.Err.Error())
	}
	return b.String()
}

func (e *OpError) Unwrap() error { return e.Err }

func quoteIfNeeded(s string) string {
	if strings.ContainsAny(s, " \t\n\"") || s == "" {
		return `"` + strings.ReplaceAll(s, `"`, `\"`) + `"`
	}
	return s
}
