package signer

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestAuditEncoding checks that AuditLog writes each record as exactly the
// bytes encoding/json gives for it, plus a newline, in one Write.
func TestAuditEncoding(t *testing.T) {
	full := AuditRecord{
		Time:          time.Date(2026, 11, 27, 4, 5, 6, 789000000, time.UTC),
		Identity:      testIdentity,
		KeyID:         "4f0a9c5e1d2b3a4f0a9c5e1d2b3a4f0a9c5e1d2b3a4f0a9c5e1d2b3a4f0a9c5e",
		Op:            OpSign,
		Scheme:        "ecdsa_secp256r1_sha256",
		ServerName:    "www.example.com",
		ClientAddress: "203.0.113.9:443",
		ConnectionID:  "conn-7",
		EdgeAddress:   "192.0.2.7:40000",
		Outcome:       "OK",
		Rule:          "test-all",
		LatencyUS:     1234,
	}
	denied := full
	denied.Outcome, denied.Error, denied.LatencyUS = "PermissionDenied", `rules "a", "b" do not allow scheme rsa_pss_rsae_sha256 with key <x> & more`, -3
	odd := full
	odd.Time = time.Date(2026, 1, 2, 3, 4, 5, 0, time.FixedZone("", -7*3600))
	odd.ServerName = "\x00\b\f\n\r\t\x1f\x7f é \u2028 \u2029 \\ \"q\""
	odd.ClientAddress = "bad utf-8: \xff\xfe\xc3"
	odd.ConnectionID = "日本語"
	tests := []struct {
		name string
		rec  AuditRecord
	}{
		{"zero", AuditRecord{}},
		{"full", full},
		{"denied", denied},
		{"escapes, zone, bad UTF-8", odd},
		{"nanoseconds", AuditRecord{Time: time.Date(1, 1, 1, 0, 0, 0, 1, time.UTC), Op: "list_keys", LatencyUS: 1 << 62}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			want, err := json.Marshal(&tt.rec)
			if err != nil {
				t.Fatal(err)
			}
			want = append(want, '\n')
			w := &recordingWriter{}
			if err := NewAuditLog(w).Audit(&tt.rec); err != nil {
				t.Fatalf("Audit() = %v", err)
			}
			if len(w.writes) != 1 || !bytes.Equal(w.writes[0], want) {
				t.Errorf("Audit() wrote %q, want one write of\n%q", w.writes, want)
			}
		})
	}
	for _, tm := range []time.Time{
		time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC),
		time.Date(2026, 1, 1, 0, 0, 0, 0, time.FixedZone("", 24*3600)),
	} {
		_, wantErr := json.Marshal(&AuditRecord{Time: tm})
		w := &recordingWriter{}
		err := NewAuditLog(w).Audit(&AuditRecord{Time: tm})
		if err == nil || wantErr == nil || err.Error() != wantErr.Error() || len(w.writes) != 0 {
			t.Errorf("Audit(time %v) = %v after %d writes, want %v and none", tm, err, len(w.writes), wantErr)
		}
	}
}

// recordingWriter keeps a copy of every Write.
type recordingWriter struct{ writes [][]byte }

func (w *recordingWriter) Write(p []byte) (int, error) {
	w.writes = append(w.writes, bytes.Clone(p))
	return len(p), nil
}

func BenchmarkAuditLog(b *testing.B) {
	rec := &AuditRecord{Time: time.Now().UTC(), Identity: testIdentity, KeyID: "4f0a9c5e1d2b3a4f0a9c5e1d2b3a4f0a9c5e1d2b3a4f0a9c5e1d2b3a4f0a9c5e",
		Op: OpSign, Scheme: "ecdsa_secp256r1_sha256", ServerName: "www.example.com", ClientAddress: "203.0.113.9:443",
		ConnectionID: "conn-7", EdgeAddress: "192.0.2.7:40000", Outcome: "OK", Rule: "test-all", LatencyUS: 1234}
	l := NewAuditLog(discard{})
	b.ReportAllocs()
	for b.Loop() {
		if err := l.Audit(rec); err != nil {
			b.Fatal(err)
		}
	}
}

// benchAuditFile returns an AuditLog on a file in b's temporary directory,
// closed when b ends, and a typical record.
func benchAuditFile(b *testing.B) (*AuditLog, *AuditRecord) {
	b.Helper()
	rec := &AuditRecord{Time: time.Now().UTC(), Identity: testIdentity, KeyID: "4f0a9c5e1d2b3a4f0a9c5e1d2b3a4f0a9c5e1d2b3a4f0a9c5e1d2b3a4f0a9c5e",
		Op: OpSign, Scheme: "ecdsa_secp256r1_sha256", ServerName: "www.example.com", ClientAddress: "203.0.113.9:443",
		ConnectionID: "conn-7", EdgeAddress: "192.0.2.7:40000", Outcome: "OK", Rule: "test-all", LatencyUS: 1234}
	f, err := os.OpenFile(filepath.Join(b.TempDir(), "audit.log"), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { f.Close() })
	return NewAuditLog(f), rec
}

// BenchmarkAuditLogParallel audits from many goroutines at once into a
// file, so that each Write is a real write(2).
func BenchmarkAuditLogParallel(b *testing.B) {
	l, rec := benchAuditFile(b)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if err := l.Audit(rec); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkAuditLogBurst audits records that arrive together, 64 at once
// as from a keyserver answering 64 requests at once, into a file. (In
// BenchmarkAuditLogParallel's tight loops, a record rarely arrives during
// another's Write: a goroutine in a short write(2) keeps its P, and a
// goroutine readied meanwhile waits for a sleeping thread to wake.)
func BenchmarkAuditLogBurst(b *testing.B) {
	const burst = 64
	l, rec := benchAuditFile(b)
	b.ReportAllocs()
	for i := 0; i < b.N; i += burst {
		var wg sync.WaitGroup
		for range min(burst, b.N-i) {
			wg.Go(func() {
				if err := l.Audit(rec); err != nil {
					b.Error(err)
				}
			})
		}
		wg.Wait()
	}
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }

// FuzzAuditEncoding checks appendAuditRecord against encoding/json for
// arbitrary strings and times.
func FuzzAuditEncoding(f *testing.F) {
	f.Add("www.example.com", "203.0.113.9:443", int64(1795752306789000000), int64(12))
	f.Add("<&>\u2028\"\\\x00\xff", "日本語", int64(-62135596800000000000/1000), int64(-1))
	f.Fuzz(func(t *testing.T, s1, s2 string, unixNano, latency int64) {
		rec := &AuditRecord{Time: time.Unix(0, unixNano).UTC(), Identity: s1, ServerName: s2, Error: s1 + s2, LatencyUS: latency}
		want, werr := json.Marshal(rec)
		got, err := appendAuditRecord(nil, rec)
		if (err != nil) != (werr != nil) || !bytes.Equal(got, want) {
			t.Fatalf("appendAuditRecord() = %q, %v; json.Marshal = %q, %v", got, err, want, werr)
		}
	})
}

// gateWriter is a writer whose Writes the test runs: each Write sends its
// bytes on entered, then returns the result the test sends on release.
type gateWriter struct {
	entered chan []byte
	release chan writeResult
}

// writeResult is the result of one Write of a gateWriter: n < 0 means all
// the bytes.
type writeResult struct {
	n     int
	err   error
	panic bool // Write panics instead
}

func newGateWriter() *gateWriter {
	return &gateWriter{entered: make(chan []byte), release: make(chan writeResult)}
}

func (w *gateWriter) Write(p []byte) (int, error) {
	w.entered <- bytes.Clone(p)
	r := <-w.release
	if r.panic {
		panic("gateWriter")
	}
	if r.n < 0 {
		r.n = len(p)
	}
	return r.n, r.err
}

// auditLine returns the line AuditLog writes for rec.
func auditLine(t testing.TB, rec *AuditRecord) string {
	t.Helper()
	b, err := json.Marshal(rec)
	if err != nil {
		t.Fatal(err)
	}
	return string(b) + "\n"
}

// waitQueued waits until n callers of l wait for the next Write, queued or
// waiting for room to queue.
func waitQueued(t *testing.T, l *AuditLog, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		l.mu.Lock()
		queued := l.fullWaiters
		if l.next != nil {
			queued += l.next.refs
		}
		l.mu.Unlock()
		if queued == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d callers queued, want %d", queued, n)
		}
		time.Sleep(time.Millisecond)
	}
}

// auditAsync starts Audit(rec) and returns the channel of its result: a
// panic is errPanicked.
func auditAsync(l *AuditLog, rec *AuditRecord) <-chan error {
	c := make(chan error, 1)
	go func() {
		defer func() {
			if recover() != nil {
				c <- errPanicked
			}
		}()
		c <- l.Audit(rec)
	}()
	return c
}

var errPanicked = errors.New("Audit panicked")

// returned reports whether the Audit behind c has returned.
func returned(c <-chan error) bool { return len(c) > 0 }

// auditRound makes one lone Audit, whose Write blocks, and queues n more
// behind it. It returns the lone caller's result and the queued callers'
// results and lines, with the lone Write still in progress.
func auditRound(t *testing.T, l *AuditLog, w *gateWriter, round, n int) (lone <-chan error, queued []<-chan error, lines []string) {
	t.Helper()
	rec := &AuditRecord{Op: OpSign, Identity: fmt.Sprintf("round %d lone", round)}
	lone = auditAsync(l, rec)
	if got, want := string(<-w.entered), auditLine(t, rec); got != want {
		t.Fatalf("lone Write(%q), want %q", got, want)
	}
	for i := range n {
		rec := &AuditRecord{Op: OpSign, Identity: fmt.Sprintf("round %d queued %d", round, i)}
		lines = append(lines, auditLine(t, rec))
		queued = append(queued, auditAsync(l, rec))
	}
	waitQueued(t, l, n)
	return lone, queued, lines
}

// checkBatch checks that batch is the lines, whole, in any order.
func checkBatch(t *testing.T, batch []byte, lines []string) {
	t.Helper()
	got := strings.SplitAfter(string(batch), "\n")
	if got[len(got)-1] == "" {
		got = got[:len(got)-1]
	}
	want := slices.Clone(lines)
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("batch Write(%q), want the lines %q", batch, lines)
	}
}

// TestAuditLogGroupCommit checks that callers that arrive during a Write
// are written together in the next one, and that no caller returns before
// the Write of its record has returned.
func TestAuditLogGroupCommit(t *testing.T) {
	w := newGateWriter()
	l := NewAuditLog(w)
	const n = 5
	lone, queued, lines := auditRound(t, l, w, 0, n)
	for i, c := range append([]<-chan error{lone}, queued...) {
		if returned(c) {
			t.Fatalf("caller %d returned during the first Write", i)
		}
	}
	w.release <- writeResult{n: -1}
	if err := <-lone; err != nil {
		t.Fatalf("lone Audit() = %v", err)
	}
	// The queued records are one Write, made once the first one ended.
	checkBatch(t, <-w.entered, lines)
	for i, c := range queued {
		if returned(c) {
			t.Fatalf("queued caller %d returned before its Write did", i)
		}
	}
	w.release <- writeResult{n: -1}
	for i, c := range queued {
		if err := <-c; err != nil {
			t.Errorf("queued caller %d: Audit() = %v", i, err)
		}
	}
	// Alone again: its own Write, at once.
	rec := &AuditRecord{Op: OpDecrypt}
	c := auditAsync(l, rec)
	if got, want := string(<-w.entered), auditLine(t, rec); got != want {
		t.Errorf("Write(%q), want %q", got, want)
	}
	w.release <- writeResult{n: -1}
	if err := <-c; err != nil {
		t.Errorf("Audit() = %v", err)
	}
}

// TestAuditLogWriteError checks that every caller whose record was in a
// failed or short Write gets its error, and that later Writes succeed.
func TestAuditLogWriteError(t *testing.T) {
	errDisk := errors.New("disk full")
	w := newGateWriter()
	l := NewAuditLog(w)
	const n = 4
	for round, tt := range []struct {
		name    string
		lone    writeResult
		batch   writeResult
		wantErr error
	}{
		{"error", writeResult{n: -1}, writeResult{err: errDisk}, errDisk},
		{"short write", writeResult{n: -1}, writeResult{n: 10}, io.ErrShortWrite},
		{"lone error", writeResult{err: errDisk}, writeResult{n: -1}, nil},
		{"lone short write", writeResult{n: 1}, writeResult{n: -1}, nil},
		{"both fine", writeResult{n: -1}, writeResult{n: -1}, nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			lone, queued, lines := auditRound(t, l, w, round, n)
			w.release <- tt.lone
			wantLone := tt.lone.err
			if tt.lone.n >= 0 && tt.lone.err == nil {
				wantLone = io.ErrShortWrite
			}
			if err := <-lone; !errors.Is(err, wantLone) {
				t.Errorf("lone Audit() = %v, want %v", err, wantLone)
			}
			checkBatch(t, <-w.entered, lines)
			w.release <- tt.batch
			for i, c := range queued {
				if err := <-c; !errors.Is(err, tt.wantErr) {
					t.Errorf("queued caller %d: Audit() = %v, want %v", i, err, tt.wantErr)
				}
			}
		})
	}
	// A Write that panics fails its records; its writer panics.
	t.Run("panic", func(t *testing.T) {
		lone, queued, lines := auditRound(t, l, w, 99, n)
		w.release <- writeResult{n: -1}
		if err := <-lone; err != nil {
			t.Fatal(err)
		}
		checkBatch(t, <-w.entered, lines)
		w.release <- writeResult{panic: true}
		panicked := 0
		for i, c := range queued {
			switch err := <-c; err {
			case errPanicked:
				panicked++
			case errAuditWritePanicked:
			default:
				t.Errorf("queued caller %d: Audit() = %v, want %v", i, err, errAuditWritePanicked)
			}
		}
		if panicked != 1 {
			t.Errorf("%d callers panicked, want the writer", panicked)
		}
	})
	// Alone, a short write fails too.
	c := auditAsync(l, &AuditRecord{})
	<-w.entered
	w.release <- writeResult{n: 3}
	if err := <-c; err != io.ErrShortWrite {
		t.Errorf("Audit() with a short write = %v, want %v", err, io.ErrShortWrite)
	}
}

// TestAuditLogBoundsBatch checks that callers that find maxAuditBatch
// bytes queued wait for the Write in progress before queuing theirs.
func TestAuditLogBoundsBatch(t *testing.T) {
	w := newGateWriter()
	l := NewAuditLog(w)
	lone := auditAsync(l, &AuditRecord{Op: "lone"})
	<-w.entered
	const n = 40 // records of 100 KiB: 4 MiB
	big := strings.Repeat("x", 100<<10)
	want := map[string]bool{}
	var queued []<-chan error
	for i := range n {
		rec := &AuditRecord{Op: strconv.Itoa(i), Identity: big}
		want[auditLine(t, rec)] = true
		queued = append(queued, auditAsync(l, rec))
	}
	waitQueued(t, l, n)
	l.mu.Lock()
	pending := len(l.next.buf)
	l.mu.Unlock()
	recSize := len(auditLine(t, &AuditRecord{Op: "00", Identity: big}))
	if pending >= maxAuditBatch+recSize {
		t.Errorf("%d bytes queued, want less than %d", pending, maxAuditBatch+recSize)
	}
	go func() {
		for range n + 1 {
			w.release <- writeResult{n: -1}
		}
	}()
	if err := <-lone; err != nil {
		t.Fatal(err)
	}
	writes := 0
	for len(want) > 0 {
		batch := <-w.entered
		writes++
		if len(batch) >= maxAuditBatch+recSize {
			t.Errorf("Write of %d bytes, want less than %d", len(batch), maxAuditBatch+recSize)
		}
		for _, line := range strings.SplitAfter(strings.TrimSuffix(string(batch), "\n"), "\n") {
			if !strings.HasSuffix(line, "\n") {
				line += "\n"
			}
			if !want[line] {
				t.Fatalf("Write of an unexpected or repeated line of %d bytes", len(line))
			}
			delete(want, line)
		}
	}
	for i, c := range queued {
		if err := <-c; err != nil {
			t.Errorf("caller %d: Audit() = %v", i, err)
		}
	}
	if writes < 4 {
		t.Errorf("%d Writes of 4 MiB of records", writes)
	}
	t.Logf("%d Writes of %d records", writes, n)
}

// slowWriter records each Write, which takes a millisecond, and the lines
// of the Writes that returned.
type slowWriter struct {
	mu      sync.Mutex
	writes  [][]byte
	written map[string]bool
}

func (w *slowWriter) Write(p []byte) (int, error) {
	time.Sleep(time.Millisecond)
	w.mu.Lock()
	defer w.mu.Unlock()
	w.writes = append(w.writes, bytes.Clone(p))
	for _, line := range strings.SplitAfter(string(p), "\n") {
		w.written[line] = true
	}
	return len(p), nil
}

// TestAuditLogCoalesces audits from many goroutines at once: every record
// is written exactly once, as a whole line, before its Audit returns, and
// there are fewer Writes than records.
func TestAuditLogCoalesces(t *testing.T) {
	const goroutines, perGoroutine = 64, 200
	w := &slowWriter{written: map[string]bool{}}
	l := NewAuditLog(w)
	at := time.Date(2026, 11, 27, 4, 5, 6, 789, time.UTC)
	record := func(g, i int) *AuditRecord {
		return &AuditRecord{Time: at, Identity: fmt.Sprintf("goroutine %d", g), Op: OpSign, ServerName: strings.Repeat("s", g),
			Outcome: "OK", LatencyUS: int64(i)}
	}
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Go(func() {
			for i := range perGoroutine {
				rec := record(g, i)
				if err := l.Audit(rec); err != nil {
					t.Errorf("Audit() = %v", err)
					return
				}
				line := auditLine(t, rec)
				w.mu.Lock()
				ok := w.written[line]
				w.mu.Unlock()
				if !ok {
					t.Errorf("Audit(%q) returned before its Write did", line)
					return
				}
			}
		})
	}
	wg.Wait()
	want := map[string]bool{}
	for g := range goroutines {
		for i := range perGoroutine {
			want[auditLine(t, record(g, i))] = true
		}
	}
	for _, p := range w.writes {
		if !bytes.HasSuffix(p, []byte("\n")) {
			t.Fatalf("Write(%q) does not end a line", p)
		}
		for _, line := range strings.SplitAfter(strings.TrimSuffix(string(p), "\n"), "\n") {
			if !strings.HasSuffix(line, "\n") {
				line += "\n"
			}
			if !json.Valid([]byte(line)) {
				t.Fatalf("line %q is not JSON", line)
			}
			if !want[line] {
				t.Fatalf("line %q is not a record, or was written twice", line)
			}
			delete(want, line)
		}
	}
	if len(want) > 0 {
		t.Errorf("%d records not written", len(want))
	}
	if records := goroutines * perGoroutine; len(w.writes) >= records {
		t.Errorf("%d Writes for %d records: none coalesced", len(w.writes), records)
	} else {
		t.Logf("%d Writes for %d records", len(w.writes), records)
	}
}
