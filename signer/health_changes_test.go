package signer

import (
	"context"
	"crypto"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/keyless-tls/keyless/link"
)

// flipChecker is a KeyStore and Checker whose Check returns
// what set last gave it.
type flipChecker struct {
	mu  sync.Mutex
	err error
}

func (f *flipChecker) Key(context.Context, link.KeyID) (crypto.Signer, error) { return nil, nil }
func (f *flipChecker) Keys(context.Context) ([]crypto.Signer, error)          { return nil, nil }
func (f *flipChecker) Check(context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.err
}
func (f *flipChecker) set(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.err = err
}

// changes is a stand-in for hsm.Module.Changed.
type changes struct {
	mu sync.Mutex
	ch chan struct{}
}

func (c *changes) changed() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ch
}

func (c *changes) notify() {
	c.mu.Lock()
	defer c.mu.Unlock()
	close(c.ch)
	c.ch = make(chan struct{})
}

// TestWatchHealthFollowsChanges checks that health is reported again when
// the module says it changed, with an interval so long that only the
// notification can explain the new report: down at once on a fault, and
// up again at once on recovery.
func TestWatchHealthFollowsChanges(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	store := &flipChecker{}
	c := &changes{ch: make(chan struct{})}
	reports := make(chan error, 16)
	done := make(chan struct{})
	go func() {
		defer close(done)
		WatchHealthChanges(ctx, store, c.changed, time.Hour, func(err error) { reports <- err })
	}()
	next := func() error {
		t.Helper()
		select {
		case err := <-reports:
			return err
		case <-time.After(10 * time.Second):
			t.Fatal("no health report within 10 s")
			return nil
		}
	}
	if err := next(); err != nil {
		t.Fatalf("first report = %v, want nil", err)
	}
	fault := errors.New("token fault")
	store.set(fault)
	c.notify()
	if err := next(); !errors.Is(err, fault) {
		t.Fatalf("report after a fault = %v, want %v", err, fault)
	}
	store.set(nil)
	c.notify()
	if err := next(); err != nil {
		t.Fatalf("report after recovery = %v, want nil", err)
	}
	cancel()
	<-done
}
