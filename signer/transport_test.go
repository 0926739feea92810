package signer

import (
	"strings"
	"testing"

	"google.golang.org/grpc/metadata"

	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// TestHeaderListSizeBounded checks that the keyserver refuses a call whose
// metadata exceeds link.MaxHeaderListSize, and takes one within it.
func TestHeaderListSizeBounded(t *testing.T) {
	ts := newTestServer(t, Config{Keys: newTestMemoryStore(t)})
	call := func(n int) error {
		ctx := metadata.AppendToOutgoingContext(testContext(t, 0), "x-filler", strings.Repeat("a", n))
		_, err := ts.client.ListKeys(ctx, &keylessv1.ListKeysRequest{})
		return err
	}
	if err := call(link.MaxHeaderListSize / 2); err != nil {
		t.Fatalf("ListKeys() with %d bytes of metadata = %v, want OK", link.MaxHeaderListSize/2, err)
	}
	err := call(2 * link.MaxHeaderListSize)
	if err == nil {
		t.Fatalf("ListKeys() with %d bytes of metadata succeeded, want it refused", 2*link.MaxHeaderListSize)
	}
	if err := call(16); err != nil {
		t.Fatalf("ListKeys() after a refused call = %v, want OK", err)
	}
}
