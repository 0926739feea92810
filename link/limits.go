package link

import (
	"strings"
	"time"
	"unicode/utf8"
)

// Limits of the KeylessService protocol, which both ends keep: the
// keyserver refuses what exceeds them and the edge never sends it.
const (
	// PremasterLen is the length of a TLS 1.2 premaster secret, and of
	// every answer to a Decrypt.
	PremasterLen = 48

	// MaxContextFieldLen bounds each field of a RequestContext, in bytes.
	MaxContextFieldLen = 256

	// MaxRequestSize is the largest request message a keyserver accepts
	// (grpc.MaxRecvMsgSize). The largest legitimate request, a Decrypt for
	// an RSA-4096 key or an Ed25519 Sign, is under 1 KiB, so a
	// StreamRequest of MaxStreamOperations of them fits with room to spare.
	MaxRequestSize = 96 << 10

	// MaxHeaderListSize bounds the headers of a call
	// (grpc.MaxHeaderListSize). An edge's are under 1 KiB; without a bound,
	// gRPC accepts 16 MiB per call and keeps its metadata for the call's
	// life, which for a Stream is the connection's.
	MaxHeaderListSize = 16 << 10

	// MaxStreamOperations is the most operations one StreamRequest may
	// carry; each operation of a message with more is answered
	// InvalidArgument.
	MaxStreamOperations = 64

	// MaxStreamsPerConnection is what a keyserver allows as HTTP/2
	// concurrent streams per connection (grpc.MaxConcurrentStreams): an
	// edge uses one Stream per connection, plus unary calls (ListKeys, and
	// every operation for an edge that does not use Stream).
	MaxStreamsPerConnection = 1024

	// DefaultOperationTimeout bounds an operation whose timeout_ms is zero.
	DefaultOperationTimeout = 2 * time.Second

	// MaxOperationTimeout caps an operation's timeout_ms.
	MaxOperationTimeout = 60 * time.Second
)

// ContextField returns s as a RequestContext field may hold it: valid UTF-8
// (each invalid byte sequence replaced by U+FFFD), cut on a character
// boundary to at most [MaxContextFieldLen] bytes. Protobuf refuses to
// encode a string that is not UTF-8, and the keyserver records these fields
// in its audit trail, so both ends pass every field through it.
func ContextField(s string) string {
	s = strings.ToValidUTF8(s, "\uFFFD")
	n := MaxContextFieldLen
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}
