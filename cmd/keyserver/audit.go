package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
)

// auditFile is the destination of the audit trail: a file opened for
// appending, which Reopen opens again after log rotation, or standard
// error. It is safe for concurrent use.
type auditFile struct {
	path string // "" for the standard error stream
	mu   sync.Mutex
	w    io.Writer
	f    *os.File // nil for standard error
}

// openAuditLog opens path for appending (creating it with mode 0600), or
// returns stderr for "-".
func openAuditLog(path string, stderr io.Writer) (*auditFile, error) {
	if path == "" {
		return nil, errors.New(`no file given; use "-" for standard error`)
	}
	if path == "-" {
		return &auditFile{w: stderr}, nil
	}
	f, err := openAppend(path)
	if err != nil {
		return nil, fmt.Errorf("open audit log: %w", err)
	}
	return &auditFile{path: path, f: f, w: f}, nil
}

// openAppend opens path for appending, creating it with mode 0600.
func openAppend(path string) (*os.File, error) {
	return os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
}

func (a *auditFile) Write(p []byte) (int, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.w.Write(p)
}

// Reopen opens the file again by name. If that fails, the old file stays
// in use; if closing the old one fails, the new one is in use. The error
// says which.
func (a *auditFile) Reopen() error {
	if a.path == "" {
		return nil
	}
	a.mu.Lock()
	closed := a.w == closedWriter{}
	a.mu.Unlock()
	if closed {
		return errAuditClosed
	}
	f, err := openAppend(a.path)
	if err != nil {
		return fmt.Errorf("audit log not reopened; still writing to the old file: %w", err)
	}
	a.mu.Lock()
	old := a.f
	a.f, a.w = f, f
	a.mu.Unlock()
	if old != nil {
		if err := old.Close(); err != nil {
			return fmt.Errorf("audit log reopened, but closing the previous file failed: %w", err)
		}
	}
	return nil
}

// errAuditClosed fails records written after Close: an operation still
// running when the keyserver stopped is refused, not answered unrecorded.
var errAuditClosed = errors.New("the audit log is closed: the keyserver is stopping")

// closedWriter is the writer of a closed auditFile.
type closedWriter struct{}

func (closedWriter) Write([]byte) (int, error) { return 0, errAuditClosed }

// Close closes the file; later writes fail with errAuditClosed.
func (a *auditFile) Close() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.w = closedWriter{}
	if a.f == nil {
		return nil
	}
	err := a.f.Close()
	a.f = nil
	return err
}
