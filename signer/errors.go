package signer

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// ValidationError reports a malformed request. Field is the name of the
// offending request field as the .proto file spells it.
type ValidationError struct {
	Field  string
	Reason string
}

func (e *ValidationError) Error() string {
	return fmt.Sprintf("signer: invalid %s: %s", e.Field, e.Reason)
}

// ErrKeyNotFound is returned for a key id the key store does not hold.
var ErrKeyNotFound = errors.New("signer: no key with that key id")

// ErrUnavailable is returned while the key store cannot be used.
var ErrUnavailable = errors.New("signer: key store unavailable")

// ErrOverloaded is returned when too many operations are already waiting
// for the key store.
var ErrOverloaded = errors.New("signer: too many operations waiting for the key store")

// PermissionError reports an operation the caller may not perform.
type PermissionError struct {
	// Identity is the caller's identity, as authenticated.
	Identity string
	// Rule names the policy rule that decided, or says that none allowed it.
	Rule string
}

func (e *PermissionError) Error() string {
	return fmt.Sprintf("signer: permission denied for %q: %s", e.Identity, e.Rule)
}

// toStatus maps an error from the service's handlers to a gRPC status. It is
// the only place where this package chooses gRPC codes. Errors with no
// specific code become Internal with a generic message; the caller logs the
// details.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	var verr *ValidationError
	var perr *PermissionError
	switch {
	case errors.As(err, &verr):
		return status.Error(codes.InvalidArgument, verr.Error())
	case errors.As(err, &perr):
		return status.Error(codes.PermissionDenied, perr.Error())
	case errors.Is(err, ErrKeyNotFound):
		return status.Error(codes.NotFound, ErrKeyNotFound.Error())
	case errors.Is(err, ErrOverloaded):
		return status.Error(codes.ResourceExhausted, ErrOverloaded.Error())
	case errors.Is(err, ErrUnavailable):
		return status.Error(codes.Unavailable, ErrUnavailable.Error())
	case errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, "signer: the key operation did not finish before the deadline")
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, "signer: the request was canceled")
	}
	return status.Error(codes.Internal, "signer: the key operation failed")
}
