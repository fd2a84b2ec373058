package agent

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/ferry-agent/ferry/cgroup"
	"github.com/ferry-agent/ferry/netsetup"
	"github.com/ferry-agent/ferry/sysctlguard"
)

// Error classes. Every error the agent returns wraps one of them; the server
// edge maps them to gRPC codes in one place (toStatus).
var (
	ErrInvalidArgument    = errors.New("invalid argument")
	ErrNotFound           = errors.New("not found")
	ErrAlreadyExists      = errors.New("already exists")
	ErrFailedPrecondition = errors.New("failed precondition")
	ErrResourceExhausted  = errors.New("resource exhausted")
	ErrCanceled           = errors.New("canceled")
)

// toStatus maps an agent error to its gRPC status.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	code := codes.Internal
	switch {
	case errors.Is(err, ErrInvalidArgument), errors.Is(err, cgroup.ErrInvalid), errors.Is(err, sysctlguard.ErrInvalid),
		errors.Is(err, netsetup.ErrInvalid):
		code = codes.InvalidArgument
	case errors.Is(err, netsetup.ErrInUse):
		code = codes.AlreadyExists
	case errors.Is(err, netsetup.ErrExhausted):
		code = codes.ResourceExhausted
	case errors.Is(err, ErrNotFound):
		code = codes.NotFound
	case errors.Is(err, ErrAlreadyExists):
		code = codes.AlreadyExists
	case errors.Is(err, ErrFailedPrecondition):
		code = codes.FailedPrecondition
	case errors.Is(err, ErrResourceExhausted), errors.Is(err, cgroup.ErrExhausted):
		code = codes.ResourceExhausted
	case errors.Is(err, context.Canceled), errors.Is(err, ErrCanceled):
		code = codes.Canceled
	case errors.Is(err, context.DeadlineExceeded):
		code = codes.DeadlineExceeded
	}
	return status.Error(code, err.Error())
}

func errInvalidf(format string, args ...any) error {
	return fmt.Errorf(format+": %w", append(args, ErrInvalidArgument)...)
}
