package signer

import (
	"encoding/json"
	"errors"
	"io"
	"strconv"
	"sync"
	"time"
	"unicode/utf8"
)

// AuditRecord is the audit trail's record of one request of the
// KeylessService: one per Sign, Decrypt and ListKeys call that reached the
// server, whatever its outcome, including requests refused before their
// handler ran (such as an oversize message).
//
// Every field is always present, so that records differ only in their
// values. A record never holds a digest, message, signature, ciphertext,
// premaster secret or PIN. A Decrypt whose ciphertext was invalid (answered
// by implicit rejection) has the same outcome, "OK", and the same fields as
// a valid one.
type AuditRecord struct {
	// Time is when the request arrived, in UTC (RFC 3339 with nanoseconds).
	Time time.Time `json:"time"`
	// Identity is the caller's identity: the certificate name the policy
	// admitted or, when it admitted none, the first name the certificate
	// presents (see Error). Empty without a verified certificate.
	Identity string `json:"identity"`
	// KeyID is the key id in hex, when the request named a 32-byte one.
	KeyID string `json:"key_id"`
	// Op is "sign", "decrypt", "list_keys" or "tickets"; "unknown" for a stream
	// operation that carries neither a sign nor a decrypt request; "stream"
	// for the end of a Stream call as a whole (its operations have their
	// own records), with the stream's outcome and lifetime.
	Op string `json:"op"`
	// Scheme is a Sign request's signature scheme, as a policy names it.
	Scheme string `json:"scheme"`
	// ServerName, ClientAddress and ConnectionID are the request's
	// RequestContext, as the edge reported it (at most link.MaxContextFieldLen
	// bytes each).
	ServerName    string `json:"server_name"`
	ClientAddress string `json:"client_address"`
	ConnectionID  string `json:"connection_id"`
	// EdgeAddress is the network address of the edge's connection.
	EdgeAddress string `json:"edge_address"`
	// Outcome is the name of the gRPC status code of the answer: "OK",
	// "PermissionDenied", "ResourceExhausted" and so on.
	Outcome string `json:"outcome"`
	// Error is the status message the caller got; empty for OK. For
	// NotFound, it goes on, in parentheses, with what the caller is not
	// told: "no such key", or "not allowed by policy: …" for a key the
	// caller's policy does not let it use (see KeyNotFoundError).
	Error string `json:"error"`
	// Rule is the policy rule that allowed the request or, for a denial,
	// the rule that applied; empty when no rule covers the identity and key.
	Rule string `json:"rule"`
	// LatencyUS is the time from the request's arrival to its answer, in
	// microseconds.
	LatencyUS int64 `json:"latency_us"`
}

// Auditor receives the audit trail: one record per request. Audit must be
// safe for concurrent use and should return quickly: the service calls it
// before it answers, so that no signature or premaster leaves the keyserver
// unrecorded. An error fails the request (Unavailable, even if the key
// operation succeeded) and makes the service refuse key operations until a
// later record is written: it fails closed.
type Auditor interface {
	Audit(rec *AuditRecord) error
}

// MultiAuditor returns an Auditor that passes each record to every one of
// auditors, in order, and returns the first error (after calling them
// all). Put the audit log first.
func MultiAuditor(auditors ...Auditor) Auditor { return multiAuditor(auditors) }

type multiAuditor []Auditor

func (a multiAuditor) Audit(rec *AuditRecord) error {
	var first error
	for _, x := range a {
		if err := x.Audit(rec); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// AuditLog is an [Auditor] that writes each record as one line of JSON to
// an io.Writer, such as an *os.File opened for appending. It is safe for
// concurrent use, and it never calls the writer's Write concurrently.
//
// Concurrent records are written together (group commit), by their
// callers: AuditLog has no goroutine of its own. A caller that finds no
// Write in progress makes one, with the records of every caller queued so
// far and its own; a lone caller thus writes its record at once. Callers
// that arrive while a Write is in progress queue their records for the
// next Write and wait for it; when the Write in progress ends, one of them
// makes it, unless a new caller does first. Each Write holds whole lines
// only, so that lines never interleave, and records are written in the
// order their callers queued them. Callers that find 1 MiB of records
// queued wait until the Write in progress ends and the queued one starts
// before they queue theirs, so that a Write holds about 1 MiB at most.
//
// Nothing is buffered across calls: when Audit returns nil, the Write that
// held its record has returned, so the record has been handed to the
// operating system (it is not fsynced). A Write that fails, or writes fewer
// bytes than it was given ([io.ErrShortWrite]), fails every record it held:
// each of their callers gets its error.
type AuditLog struct {
	w io.Writer

	mu sync.Mutex
	// writing is set while a caller, the writer, is in w.Write.
	writing bool
	// next holds the records of the callers waiting for the next Write;
	// nil when there are none.
	next *auditBatch
	// spare is a batch that no caller uses any more, kept to be next.
	spare *auditBatch
	// full is where callers wait while next holds maxAuditBatch bytes or
	// more, until its Write starts; fullWaiters counts them.
	full        sync.Cond
	fullWaiters int
}

// auditBatch is the records of one Write but the writer's, when the writer
// is not alone. Its fields are guarded by the AuditLog's mu.
type auditBatch struct {
	buf []byte // whole JSON lines
	// refs counts the callers with a record in buf that have not returned.
	refs int
	done bool  // buf was written, with the result err
	err  error // the Write's error
	// cond wakes the batch's callers when it is done, and one of them when
	// the Write before it ended, to make its Write.
	cond sync.Cond
}

// maxAuditBatch is the size of queued records from which callers wait
// for the Write of those records to start before queuing theirs: a batch
// is smaller than maxAuditBatch plus one record.
const maxAuditBatch = 1 << 20

// maxSpareAuditBatch keeps the buffer of a rare huge batch from being
// reused.
const maxSpareAuditBatch = 64 << 10

// errAuditWritePanicked is the error of the records of a batch whose Write
// panicked (its writer's caller gets the panic).
var errAuditWritePanicked = errors.New("audit log: Write panicked")

var _ Auditor = (*AuditLog)(nil)

// NewAuditLog returns an AuditLog that writes to w.
func NewAuditLog(w io.Writer) *AuditLog {
	l := &AuditLog{w: w}
	l.full.L = &l.mu
	return l
}

// Audit writes rec as one JSON line, alone or with the records of
// concurrent callers, and returns once that Write has returned, with its
// error.
func (l *AuditLog) Audit(rec *AuditRecord) error {
	bp := auditBuffers.Get().(*[]byte)
	defer func() {
		if cap(*bp) <= maxPooledAuditBuffer {
			auditBuffers.Put(bp)
		}
	}()
	b, err := appendAuditRecord((*bp)[:0], rec)
	if err != nil {
		return err
	}
	b = append(b, '\n')
	*bp = b

	l.mu.Lock()
	for l.next != nil && len(l.next.buf) >= maxAuditBatch {
		l.fullWaiters++
		l.full.Wait()
		l.fullWaiters--
	}
	if !l.writing && l.next == nil {
		// Alone: write rec from its own buffer.
		l.writing = true
		l.mu.Unlock()
		return l.write(nil, b)
	}
	batch := l.next
	if batch == nil {
		batch = l.newBatch()
		l.next = batch
	}
	batch.buf = append(batch.buf, b...)
	batch.refs++
	for !batch.done {
		if !l.writing {
			// The Write before ended: make this batch's. Nobody appends to
			// it any more, so its buffer is read without the lock.
			l.writing = true
			l.next = nil
			if l.fullWaiters > 0 {
				l.full.Broadcast()
			}
			l.mu.Unlock()
			return l.write(batch, batch.buf)
		}
		// Either a Write before this batch's is in progress, whose end
		// wakes one caller of this batch, or this batch's, whose end wakes
		// them all.
		batch.cond.Wait()
	}
	err = batch.err
	l.release(batch)
	l.mu.Unlock()
	return err
}

// write makes the Write of p, the records of batch (nil for a lone
// record), as the writer, and ends it: it wakes batch's callers and hands
// the next Write to a caller of the next batch.
func (l *AuditLog) write(batch *auditBatch, p []byte) error {
	ended := false
	defer func() {
		if !ended { // Write panicked: fail its records, free the log.
			l.end(batch, errAuditWritePanicked)
		}
	}()
	n, err := l.w.Write(p)
	if err == nil && n < len(p) {
		err = io.ErrShortWrite
	}
	ended = true
	l.end(batch, err)
	return err
}

// end ends the Write in progress, of batch (nil for a lone record), whose
// result is err.
func (l *AuditLog) end(batch *auditBatch, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.writing = false
	if batch != nil {
		batch.done, batch.err = true, err
		batch.cond.Broadcast()
		l.release(batch) // the writer's own record
	}
	if l.next != nil {
		// Every caller of next waits on its cond: one of them makes its
		// Write, unless a new caller does first.
		l.next.cond.Signal()
	}
}

// newBatch returns an empty batch. l.mu is held.
func (l *AuditLog) newBatch() *auditBatch {
	if b := l.spare; b != nil {
		l.spare = nil
		return b
	}
	b := &auditBatch{}
	b.cond.L = &l.mu
	return b
}

// release drops the reference of a caller returning from a done batch, and
// keeps the batch as spare once no caller uses it. l.mu is held.
func (l *AuditLog) release(b *auditBatch) {
	b.refs--
	if b.refs == 0 && l.spare == nil && cap(b.buf) <= maxSpareAuditBatch {
		b.buf, b.done, b.err = b.buf[:0], false, nil
		l.spare = b
	}
}

// auditBuffers holds the buffers AuditLog encodes records into. An
// io.Writer must not retain the slice it is given, so a buffer is reused
// once Write returns or its record is copied into a batch.
var auditBuffers = sync.Pool{New: func() any { b := make([]byte, 0, 512); return &b }}

// maxPooledAuditBuffer keeps a rare huge record's buffer out of the pool.
const maxPooledAuditBuffer = 16 << 10

// appendAuditRecord appends rec's JSON encoding to b: the bytes
// json.Marshal(rec) returns, without its reflection and allocations.
// Strings that need escaping, and times json cannot encode, are left to
// encoding/json, so that the output stays identical (TestAuditEncoding).
func appendAuditRecord(b []byte, rec *AuditRecord) ([]byte, error) {
	b = append(b, `{"time":"`...)
	// AppendText is MarshalJSON without the quotes and the allocation: the
	// same RFC 3339 form, refused in the same cases.
	b, err := rec.Time.AppendText(b)
	if err != nil {
		return json.Marshal(rec) // fails too; let it say why
	}
	b = append(b, '"')
	b = appendJSONField(b, `,"identity":`, rec.Identity)
	b = appendJSONField(b, `,"key_id":`, rec.KeyID)
	b = appendJSONField(b, `,"op":`, rec.Op)
	b = appendJSONField(b, `,"scheme":`, rec.Scheme)
	b = appendJSONField(b, `,"server_name":`, rec.ServerName)
	b = appendJSONField(b, `,"client_address":`, rec.ClientAddress)
	b = appendJSONField(b, `,"connection_id":`, rec.ConnectionID)
	b = appendJSONField(b, `,"edge_address":`, rec.EdgeAddress)
	b = appendJSONField(b, `,"outcome":`, rec.Outcome)
	b = appendJSONField(b, `,"error":`, rec.Error)
	b = appendJSONField(b, `,"rule":`, rec.Rule)
	b = append(b, `,"latency_us":`...)
	b = strconv.AppendInt(b, rec.LatencyUS, 10)
	return append(b, '}'), nil
}

// appendJSONField appends name and s as a JSON string, as encoding/json
// writes it.
func appendJSONField(b []byte, name, s string) []byte {
	b = append(b, name...)
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c >= utf8.RuneSelf || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			// Escapes, HTML-safe escapes, UTF-8 checks: encoding/json's.
			q, _ := json.Marshal(s) // a string always encodes
			return append(b, q...)
		}
	}
	b = append(b, '"')
	b = append(b, s...)
	return append(b, '"')
}
