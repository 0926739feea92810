package signer

import (
	"context"
	"encoding/hex"
	"time"

	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"

	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// call is what the service learns about one request, for its audit record.
// It is used by one goroutine at a time: the RPC's handler, then the stats
// handler when the RPC ends (grpc-go calls both on the stream's goroutine).
//
// A call starts when its request arrives: in the stats handler's TagRPC
// for an RPC, in withCall for an operation of a Stream, or in begin when a
// handler is called without either. It is recorded once: by the finish
// function begin returns, which the handler calls before it answers, or,
// for a request gRPC refused before its handler ran, by the stats
// handler's HandleRPC when the RPC ends.
type call struct {
	op         string
	start      time.Time
	identified bool
	identity   string
	keyID      string // hex, only for a 32-byte key_id
	keyIDLen   int    // the length of the request's key_id
	scheme     string
	rule       string
	ctx        *keylessv1.RequestContext
	// edgeAddress is the peer's address, once identify has run.
	edgeAddress string
	// detail, when set, is added to the record's error for the operator
	// only: why a key was answered NOT_FOUND (see KeyNotFoundError).
	detail string
	// recorded is set once the record is written.
	recorded bool
	// streamed is set for an operation of a Stream.
	streamed bool
}

type callKey struct{}

func callFrom(ctx context.Context) *call {
	c, _ := ctx.Value(callKey{}).(*call)
	return c
}

// withCall returns ctx carrying a new call record for a stream operation
// op, arrived at start.
func withCall(ctx context.Context, op string, start time.Time) context.Context {
	return context.WithValue(ctx, callKey{}, &call{op: op, start: start, streamed: true})
}

// methodOps maps the service's gRPC methods to audited operations.
var methodOps = map[string]string{
	keylessv1.KeylessService_Sign_FullMethodName:     OpSign,
	keylessv1.KeylessService_Decrypt_FullMethodName:  OpDecrypt,
	keylessv1.KeylessService_ListKeys_FullMethodName: "list_keys",
	keylessv1.KeylessService_Stream_FullMethodName:   OpStream,

	keylessv1.KeylessService_GetTicketKeys_FullMethodName: OpTickets,
}

// begin returns the call of a request: the one the stats handler created
// when the RPC arrived, or a new one when the handler is called directly.
// finish writes its record, with the outcome of err (a status error or
// nil), and returns the error of the write.
func (s *Service) begin(ctx context.Context, op string) (c *call, finish func(err error) error) {
	c = callFrom(ctx)
	if c == nil || c.op != op || c.recorded {
		c = &call{op: op, start: time.Now()}
	}
	return c, func(err error) error {
		c.recorded = true
		return s.record(ctx, c, err, time.Now())
	}
}

// setRequest records the request's fields that the audit trail keeps.
func (c *call) setRequest(keyID []byte, rc *keylessv1.RequestContext) {
	c.keyID, c.keyIDLen = hexKeyID(keyID), len(keyID)
	c.ctx = rc
}

// hexKeyID returns the hex form of a 32-byte key id, or "" for anything
// else.
func hexKeyID(b []byte) string {
	var buf [2 * len(link.KeyID{})]byte
	if len(b) != len(link.KeyID{}) {
		return ""
	}
	hex.Encode(buf[:], b)
	return string(buf[:]) // one allocation, where hex.EncodeToString makes two
}

// record writes c's audit record, with the outcome of err (a status error
// or nil).
func (s *Service) record(ctx context.Context, c *call, err error, end time.Time) error {
	if s.audit == nil {
		return nil
	}
	if !c.identified {
		// The request never reached its handler (an oversize message, say):
		// identify the caller for the record alone.
		_, _ = identify(ctx, s.policy.Load(), c)
	}
	st := status.Convert(err)
	rec := &AuditRecord{
		Time:          c.start.UTC(),
		Identity:      c.identity,
		KeyID:         c.keyID,
		Op:            c.op,
		Scheme:        c.scheme,
		ServerName:    link.ContextField(c.ctx.GetServerName()),
		ClientAddress: link.ContextField(c.ctx.GetClientAddress()),
		ConnectionID:  link.ContextField(c.ctx.GetConnectionId()),
		EdgeAddress:   c.edgeAddress,
		Outcome:       st.Code().String(),
		Error:         auditError(st.Message(), c.detail),
		Rule:          c.rule,
		LatencyUS:     end.Sub(c.start).Microseconds(),
	}
	if werr := s.audit.Audit(rec); werr != nil {
		if !s.auditFailing.Swap(true) {
			s.logger.Error("audit record could not be written: key operations are refused until the audit trail works again", "error", werr)
		}
		return werr
	}
	if s.auditFailing.Swap(false) {
		s.logger.Info("audit trail writable again: key operations resume")
	}
	return nil
}

// auditError is the error field of a record: the status message the caller
// got, then, in parentheses, what the operator alone is told.
func auditError(msg, detail string) string {
	if detail == "" {
		return msg
	}
	return msg + " (" + detail + ")"
}

// StatsHandler returns the gRPC stats handler that completes the audit
// trail of a server that serves s: install it with grpc.StatsHandler. The
// handlers record every request that reaches them, before they answer; the
// stats handler records, when the RPC ends, those that gRPC itself refused
// before the handler ran (a message over the server's MaxRecvMsgSize, one
// that does not decode), and makes each record's latency start when the
// RPC arrived. Without it, such refusals go unrecorded.
func (s *Service) StatsHandler() stats.Handler { return auditHandler{s} }

type auditHandler struct{ s *Service }

func (h auditHandler) TagRPC(ctx context.Context, info *stats.RPCTagInfo) context.Context {
	op, ok := methodOps[info.FullMethodName]
	if !ok {
		return ctx
	}
	return context.WithValue(ctx, callKey{}, &call{op: op, start: time.Now()})
}

func (h auditHandler) HandleRPC(ctx context.Context, st stats.RPCStats) {
	end, ok := st.(*stats.End)
	if !ok {
		return
	}
	// The handler ran on this goroutine, if at all, and has returned.
	if c := callFrom(ctx); c != nil && !c.recorded {
		c.recorded = true
		_ = h.s.record(ctx, c, end.Error, end.EndTime)
	}
}

// TagConn gives each connection its cache of the caller's identity (see
// connIdentity).
func (auditHandler) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context {
	return context.WithValue(ctx, connIdentityKey{}, &connIdentity{})
}

func (auditHandler) HandleConn(context.Context, stats.ConnStats) {}
