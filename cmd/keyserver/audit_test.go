package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/keyless-tls/keyless/signer"
)

// TestAuditFileReopen rotates the audit log while records are written
// concurrently: every record is in one of the files, once, as a whole
// line, and nothing is written after Close.
func TestAuditFileReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	a, err := openAuditLog(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	l := signer.NewAuditLog(a)
	const goroutines, perGoroutine, rotations = 16, 300, 20
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Go(func() {
			for i := range perGoroutine {
				if err := l.Audit(&signer.AuditRecord{Op: "sign", Identity: fmt.Sprintf("%d/%d", g, i)}); err != nil {
					t.Errorf("Audit() = %v", err)
					return
				}
			}
		})
	}
	for i := range rotations {
		if err := os.Rename(path, fmt.Sprintf("%s.%d", path, i)); err != nil {
			t.Fatal(err)
		}
		if err := a.Reopen(); err != nil {
			t.Fatalf("Reopen() = %v", err)
		}
	}
	wg.Wait()
	if err := a.Close(); err != nil {
		t.Fatalf("Close() = %v", err)
	}
	seen := map[string]bool{}
	files, _ := filepath.Glob(path + "*")
	if len(files) != rotations+1 {
		t.Errorf("%d files, want %d", len(files), rotations+1)
	}
	for _, name := range files {
		data, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		if len(data) > 0 && data[len(data)-1] != '\n' {
			t.Errorf("%s ends in a partial line", name)
		}
		for _, line := range strings.Split(strings.TrimSuffix(string(data), "\n"), "\n") {
			if line == "" {
				continue
			}
			var rec signer.AuditRecord
			if err := json.Unmarshal([]byte(line), &rec); err != nil {
				t.Fatalf("%s: line %q: %v", name, line, err)
			}
			if seen[rec.Identity] {
				t.Errorf("record %s written twice", rec.Identity)
			}
			seen[rec.Identity] = true
		}
	}
	if len(seen) != goroutines*perGoroutine {
		t.Errorf("%d records in the files, want %d", len(seen), goroutines*perGoroutine)
	}
}

// TestAuditFileClosed: a record written after Close fails, so that the
// service refuses the operation instead of answering it unrecorded.
func TestAuditFileClosed(t *testing.T) {
	for _, path := range []string{filepath.Join(t.TempDir(), "audit.jsonl"), "-"} {
		a, err := openAuditLog(path, io.Discard)
		if err != nil {
			t.Fatal(err)
		}
		if err := a.Close(); err != nil {
			t.Fatalf("Close() = %v", err)
		}
		log := signer.NewAuditLog(a)
		if err := log.Audit(&signer.AuditRecord{Op: signer.OpSign}); !errors.Is(err, errAuditClosed) {
			t.Errorf("%s: Audit() after Close = %v, want errAuditClosed", path, err)
		}
		if err := a.Reopen(); path != "-" && !errors.Is(err, errAuditClosed) {
			t.Errorf("%s: Reopen() after Close = %v, want errAuditClosed", path, err)
		}
	}
}

// TestAuditFileReopenErrors: the error of a failed reopen says which file
// is in use.
func TestAuditFileReopenErrors(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "audit.log")
	a, err := openAuditLog(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	write := func(s string) {
		t.Helper()
		if _, err := a.Write([]byte(s + "\n")); err != nil {
			t.Fatalf("Write() = %v", err)
		}
	}
	write("first")

	// The name is now a directory: the old file stays in use.
	if err := os.Rename(path, path+".1"); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(path, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := a.Reopen(); err == nil || !strings.Contains(err.Error(), "still writing to the old file") {
		t.Fatalf("Reopen() onto a directory = %v, want an error saying the old file stays", err)
	}
	write("second")
	if b, _ := os.ReadFile(path + ".1"); string(b) != "first\nsecond\n" {
		t.Fatalf("old file = %q, want both lines", b)
	}

	// The old file cannot be closed: the new one is in use all the same.
	os.Remove(path)
	a.f.Close()
	if err := a.Reopen(); err == nil || !strings.Contains(err.Error(), "reopened, but closing the previous file failed") {
		t.Fatalf("Reopen() with a failing close = %v, want an error saying the new file is in use", err)
	}
	write("third")
	if b, _ := os.ReadFile(path); string(b) != "third\n" {
		t.Fatalf("new file = %q, want the third line", b)
	}
}
