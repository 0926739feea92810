package signer

import (
	"errors"
	"fmt"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// tempError is a key store error that says whether the store may work
// again later, as package hsm's UnavailableError does.
type tempError struct{ unavailable bool }

func (e *tempError) Error() string     { return "hsm: token unavailable" }
func (e *tempError) Unavailable() bool { return e.unavailable }

func TestToStatusUnavailable(t *testing.T) {
	tests := []struct {
		err  error
		want codes.Code
	}{
		{&tempError{true}, codes.Unavailable},
		{fmt.Errorf("hsm: sign with key %q: %w", "k", &tempError{true}), codes.Unavailable},
		{&tempError{false}, codes.Internal},
		{errors.New("hsm: something else"), codes.Internal},
	}
	for _, tt := range tests {
		if got := status.Code(toStatus(tt.err)); got != tt.want {
			t.Errorf("toStatus(%v) = %v, want %v", tt.err, got, tt.want)
		}
	}
}
