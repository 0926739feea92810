package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sync"
	"syscall"
	"time"
)

// syncBuffer is a bytes.Buffer safe for concurrent writers and readers.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// proc is a process started by the orchestrator. Its output is kept in
// memory and written to a log file when it ends. It is killed if the
// orchestrator dies (see setDeathSignal).
type proc struct {
	name   string
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	stdout syncBuffer
	stderr syncBuffer
	done   chan struct{}
	err    error
	logDir string
}

// startProc starts path with args and the extra environment env.
func startProc(name, logDir string, env []string, path string, args ...string) (*proc, error) {
	p := &proc{name: name, done: make(chan struct{}), logDir: logDir}
	p.cmd = exec.Command(path, args...)
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.Stdout, p.cmd.Stderr = &p.stdout, &p.stderr
	setDeathSignal(p.cmd)
	stdin, err := p.cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	p.stdin = stdin
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("bench: start %s: %w", name, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		p.saveLog()
		close(p.done)
	}()
	return p, nil
}

func (p *proc) saveLog() {
	if p.logDir == "" {
		return
	}
	out := "## stdout\n" + p.stdout.String() + "## stderr\n" + p.stderr.String()
	_ = os.WriteFile(filepath.Join(p.logDir, p.name+".log"), []byte(out), 0o644)
}

// waitFor waits until stdout or stderr matches re and returns the
// submatches.
func (p *proc) waitFor(re *regexp.Regexp, timeout time.Duration) ([]string, error) {
	deadline := time.Now().Add(timeout)
	for {
		if m := re.FindStringSubmatch(p.stdout.String()); m != nil {
			return m, nil
		}
		if m := re.FindStringSubmatch(p.stderr.String()); m != nil {
			return m, nil
		}
		select {
		case <-p.done:
			return nil, fmt.Errorf("bench: %s exited (%v) before printing %q:\n%s", p.name, p.err, re, p.tail())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("bench: %s did not print %q within %v:\n%s", p.name, re, timeout, p.tail())
		}
	}
}

// tail returns the end of the process's standard error.
func (p *proc) tail() string {
	s := p.stderr.String()
	if len(s) > 2000 {
		s = "…" + s[len(s)-2000:]
	}
	return s
}

// stop closes the process's standard input and sends SIGTERM, then kills
// it if it has not exited after 10 s.
func (p *proc) stop() {
	p.stdin.Close()
	select {
	case <-p.done:
		return
	case <-time.After(100 * time.Millisecond):
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
	}
}

// runChild runs a child to completion within timeout and returns its
// standard output.
func runChild(ctx context.Context, name, logDir string, env []string, path string, timeout time.Duration, args ...string) (string, error) {
	p, err := startProc(name, logDir, env, path, args...)
	if err != nil {
		return "", err
	}
	p.stdin.Close()
	select {
	case <-ctx.Done():
		p.cmd.Process.Kill()
		<-p.done
		return "", ctx.Err()
	case <-p.done:
	case <-time.After(timeout):
		p.cmd.Process.Kill()
		<-p.done
		return "", fmt.Errorf("bench: %s did not finish within %v; killed:\n%s", name, timeout, p.tail())
	}
	if p.err != nil {
		var ee *exec.ExitError
		if errors.As(p.err, &ee) {
			return p.stdout.String(), fmt.Errorf("bench: %s: %v:\n%s", name, p.err, p.tail())
		}
		return "", p.err
	}
	return p.stdout.String(), nil
}
