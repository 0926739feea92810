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

// ConfigError reports a field of a [Config] or [Quota] whose value is out
// of range.
type ConfigError struct {
	// Field is the field's path, such as "Config.Quota.Rate".
	Field string
	// Value is the value found.
	Value any
	// Want says what the value must be.
	Want string
}

func (e *ConfigError) Error() string {
	return fmt.Sprintf("signer: %s is %v; it must be %s", e.Field, e.Value, e.Want)
}

// ErrKeyNotFound is what a caller is told of a key it cannot use, whether
// the key store does not hold it or the policy does not let the caller use
// it: what the policy does not allow does not exist for the caller, so it
// cannot probe which keys a keyserver holds. The service returns it as a
// *[KeyNotFoundError], which says which for the operator.
var ErrKeyNotFound = errors.New("signer: no key with that key id that this identity may use")

// KeyNotFoundError reports a request for a key that the caller may not use
// at all: the key store does not hold it, or no rule of the policy names
// both the caller and the key. The caller gets NOT_FOUND with
// [ErrKeyNotFound]'s message for both; Reason, in the audit record and the
// log, tells the operator which.
type KeyNotFoundError struct {
	// Identity is the caller's identity.
	Identity string
	// ByPolicy is set when the key exists but the policy does not let the
	// caller use it.
	ByPolicy bool
	// Reason is "no such key" or "not allowed by policy: …".
	Reason string
}

func (e *KeyNotFoundError) Error() string { return ErrKeyNotFound.Error() + " (" + e.Reason + ")" }

// Unwrap returns ErrKeyNotFound.
func (e *KeyNotFoundError) Unwrap() error { return ErrKeyNotFound }

// ErrUnavailable is returned while the key store cannot be used.
var ErrUnavailable = errors.New("signer: key store unavailable")

// ErrOverloaded is returned when too many operations are already waiting
// for the key store.
var ErrOverloaded = errors.New("signer: too many operations waiting for the key store")

// ErrAuditUnavailable is returned for key operations while the audit trail
// cannot be written: the service refuses to perform operations it cannot
// record.
var ErrAuditUnavailable = errors.New("signer: the audit trail cannot be written; key operations are refused until it can")

// ErrCredentialExpired is returned for a request on a connection whose
// client certificate, or a certificate of its chain, has expired since the
// connection was opened.
var ErrCredentialExpired = errors.New("signer: the client certificate of this connection has expired")

// ErrCredentialRevoked is returned for a request on a connection whose
// client certificate, or a certificate of its chain, has been revoked since
// the connection was opened.
var ErrCredentialRevoked = errors.New("signer: the client certificate of this connection has been revoked")

// PermissionError reports an operation the caller may not perform.
type PermissionError struct {
	// Identity is the caller's identity, as authenticated; empty when the
	// caller has none the policy admits.
	Identity string
	// Rule is the name of the policy rule that applied: the first rule
	// that names the identity and the key. It is empty when no rule covers
	// them.
	Rule string
	// Reason says what was refused and why, naming the rule.
	Reason string
}

func (e *PermissionError) Error() string {
	return "signer: permission denied: " + e.Reason
}

// QuotaError reports a caller that is over its quota.
type QuotaError struct {
	// Identity is the caller's identity.
	Identity string
	// Quota names the limit: a quota of the policy, or the keyserver's
	// default for every identity.
	Quota string
	// Limit says which limit was reached, such as "at most 4 operations in
	// flight".
	Limit string
}

func (e *QuotaError) Error() string {
	return fmt.Sprintf("signer: identity %q is over its quota (%s): %s", e.Identity, e.Quota, e.Limit)
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
	var qerr *QuotaError
	switch {
	case errors.As(err, &verr):
		return status.Error(codes.InvalidArgument, verr.Error())
	case errors.Is(err, ErrCredentialExpired), errors.Is(err, ErrCredentialRevoked):
		return status.Error(codes.Unauthenticated, err.Error())
	case errors.As(err, &perr):
		return status.Error(codes.PermissionDenied, perr.Error())
	case errors.As(err, &qerr):
		return status.Error(codes.ResourceExhausted, qerr.Error())
	case errors.Is(err, ErrNoTicketSecret):
		return status.Error(codes.Unavailable, ErrNoTicketSecret.Error())
	case errors.Is(err, ErrAuditUnavailable):
		return status.Error(codes.Unavailable, ErrAuditUnavailable.Error())
	case errors.Is(err, ErrKeyNotFound):
		return status.Error(codes.NotFound, ErrKeyNotFound.Error())
	case errors.Is(err, ErrOverloaded):
		return status.Error(codes.ResourceExhausted, ErrOverloaded.Error())
	case errors.Is(err, ErrUnavailable), isUnavailable(err):
		return status.Error(codes.Unavailable, ErrUnavailable.Error())
	case errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, "signer: the key operation did not finish before the deadline")
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, "signer: the request was canceled")
	}
	return status.Error(codes.Internal, "signer: the key operation failed")
}

// isUnavailable reports whether err, from a key store or one of its keys,
// says the store cannot perform operations now but may later (or another
// keyserver may): an HSM that is reconnecting after a fault, or whose
// calls are all stuck. Key stores say so with a method Unavailable() bool,
// as package hsm's UnavailableError, so that this package need not import
// them. Such errors become Unavailable, which clients retry elsewhere.
func isUnavailable(err error) bool {
	var u interface{ Unavailable() bool }
	return errors.As(err, &u) && u.Unavailable()
}
