package signer

import (
	"bytes"
	"encoding/json"
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
