package tlscore

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"math/big"
	"net"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
	"github.com/keyless-tls/keyless/signer"
)

// fakeClock is a clock tests move by hand.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// derivedSource answers GetTicketKeys from signer.TicketKeys at clock's
// time, as a keyserver would, or fails with err when set.
type derivedSource struct {
	keys  *signer.TicketKeys
	group string
	clock *fakeClock
	mu    sync.Mutex
	err   error
	calls int
}

func (s *derivedSource) TicketKeys(context.Context) (*keylessv1.GetTicketKeysResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.calls++
	if s.err != nil {
		return nil, s.err
	}
	return s.keys.Keys(s.group, s.clock.now())
}

func (s *derivedSource) fail(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.err = err
}

// keyRecorder records what a fetcher installs.
type keyRecorder struct {
	mu   sync.Mutex
	sets [][][32]byte
}

func (r *keyRecorder) SetSessionTicketKeys(keys [][32]byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.sets = append(r.sets, keys)
}

func (r *keyRecorder) last() [][32]byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.sets) == 0 {
		return nil
	}
	return r.sets[len(r.sets)-1]
}

func mustTicketKeys(t *testing.T, period, accept time.Duration) *signer.TicketKeys {
	t.Helper()
	tk, err := signer.NewTicketKeys(signer.TicketConfig{Secret: bytes.Repeat([]byte{0x5a}, 32), Period: period, Accept: accept})
	if err != nil {
		t.Fatalf("NewTicketKeys() = %v", err)
	}
	return tk
}

func newTestFetcher(t *testing.T, src TicketKeySource, target TicketKeyTarget, clock *fakeClock) *TicketFetcher {
	t.Helper()
	f, err := NewTicketFetcher(TicketFetcherConfig{Source: src, Target: target, now: clock.now})
	if err != nil {
		t.Fatalf("NewTicketFetcher() = %v", err)
	}
	return f
}

// keyAt returns the key of group for the period that covers at.
func keyAt(t *testing.T, tk *signer.TicketKeys, group string, at time.Time) [32]byte {
	t.Helper()
	resp, err := tk.Keys(group, at)
	if err != nil {
		t.Fatal(err)
	}
	return [32]byte(resp.Keys[1].Key) // [0] is the next period's
}

// TestTicketFetcherRotation follows one fetcher through two rotations, a
// keyserver outage and its end: the key of the current period always
// comes first, then the next period's, then the earlier ones still
// accepted, newest first.
func TestTicketFetcherRotation(t *testing.T) {
	const period, accept = time.Hour, 90 * time.Minute
	t0 := time.Date(2026, 12, 7, 10, 10, 0, 0, time.UTC)
	clock := &fakeClock{t: t0}
	tk := mustTicketKeys(t, period, accept)
	src := &derivedSource{keys: tk, group: "eu", clock: clock}
	rec := &keyRecorder{}
	f := newTestFetcher(t, src, rec, clock)
	if err := f.Fetch(t.Context()); err != nil {
		t.Fatalf("Fetch() = %v", err)
	}
	k := func(h int) [32]byte { return keyAt(t, tk, "eu", time.Date(2026, 12, 7, h, 30, 0, 0, time.UTC)) }
	check := func(what string, want ...[32]byte) {
		t.Helper()
		f.mu.Lock()
		f.installLocked()
		f.mu.Unlock()
		got := rec.last()
		if len(got) != len(want) {
			t.Fatalf("%s: %d keys installed, want %d", what, len(got), len(want))
		}
		for i := range want {
			if got[i] != want[i] {
				t.Errorf("%s: key %d is not the expected one", what, i)
			}
		}
	}
	// 10:10: 10h seals; 11h is next; 9h accepted until 11:30, 8h until 10:30.
	check("10:10", k(10), k(11), k(9), k(8))
	// 10:40: 8h is past its window.
	clock.add(30 * time.Minute)
	check("10:40", k(10), k(11), k(9))
	// 11:05 with the keyserver down: the fetcher rotates by itself to the
	// next key it already holds.
	src.fail(status.Error(codes.Unavailable, "down"))
	clock.add(25 * time.Minute)
	if err := f.Fetch(t.Context()); err == nil {
		t.Fatal("Fetch() with the keyserver down = nil")
	}
	check("11:05, keyserver down", k(11), k(10), k(9))
	// 13:00, still down: 11h is past its period and 10h and 9h past their
	// windows; 11h keeps sealing and opening.
	clock.add(115 * time.Minute)
	check("13:00, keyserver down", k(11))
	if !f.stale {
		t.Error("the fetcher does not know its sealing key is past its period")
	}
	// The keyserver is back.
	src.fail(nil)
	if err := f.Fetch(t.Context()); err != nil {
		t.Fatalf("Fetch() = %v", err)
	}
	check("13:00, keyserver back", k(13), k(14), k(12), k(11))
}

func TestTicketFetcherRejectsBadAnswers(t *testing.T) {
	clock := &fakeClock{t: time.Now()}
	for _, tt := range []struct {
		name string
		resp *keylessv1.GetTicketKeysResponse
	}{
		{"no key", &keylessv1.GetTicketKeysResponse{}},
		{"short key", &keylessv1.GetTicketKeysResponse{Keys: []*keylessv1.TicketKey{{Key: make([]byte, 31), NotBeforeUnixMs: 1, SealUntilUnixMs: 2, AcceptUntilUnixMs: 3}}}},
		{"times out of order", &keylessv1.GetTicketKeysResponse{Keys: []*keylessv1.TicketKey{{Key: make([]byte, 32), NotBeforeUnixMs: 2, SealUntilUnixMs: 2, AcceptUntilUnixMs: 3}}}},
	} {
		rec := &keyRecorder{}
		f := newTestFetcher(t, staticSource{tt.resp}, rec, clock)
		if err := f.Fetch(t.Context()); err == nil || rec.last() != nil {
			t.Errorf("%s: Fetch() = %v, installed %d keys; want an error and nothing installed", tt.name, err, len(rec.last()))
		}
	}
}

type staticSource struct {
	resp *keylessv1.GetTicketKeysResponse
}

func (s staticSource) TicketKeys(context.Context) (*keylessv1.GetTicketKeysResponse, error) {
	return s.resp, nil
}

// TestTicketFetcherSharesSessions resumes, on one tls.Config, sessions
// made on another whose keys come from the same group; across a rotation;
// not after the acceptance window; and never across groups.
func TestTicketFetcherSharesSessions(t *testing.T) {
	const period, accept = time.Hour, time.Hour
	clock := &fakeClock{t: time.Now()}
	tk := mustTicketKeys(t, period, accept)
	cert := selfSigned(t)
	edge := func(group string) *tls.Config {
		cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13}
		if err := newTestFetcher(t, &derivedSource{keys: tk, group: group, clock: clock}, cfg, clock).Fetch(t.Context()); err != nil {
			t.Fatalf("Fetch() = %v", err)
		}
		return cfg
	}
	a, b, other := edge("eu"), edge("eu"), edge("us")
	refetch := func(cfgs ...*tls.Config) {
		for _, c := range cfgs {
			if err := newTestFetcher(t, &derivedSource{keys: tk, group: "eu", clock: clock}, c, clock).Fetch(t.Context()); err != nil {
				t.Fatal(err)
			}
		}
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert.Leaf)
	client := &tls.Config{RootCAs: pool, ServerName: "edge.test", ClientSessionCache: tls.NewLRUClientSessionCache(8)}

	if resumes(t, a, client) {
		t.Fatal("first handshake resumed")
	}
	if !resumes(t, b, client) {
		t.Error("a session made on edge A did not resume on edge B of the same group")
	}
	clock.add(period) // a rotation: the ticket's key is now an earlier one
	refetch(a, b)
	if !resumes(t, b, client) {
		t.Error("no resumption after one rotation")
	}
	// The last ticket was sealed with the key of this period: one period
	// and the acceptance window later, it no longer opens.
	clock.add(period + accept)
	refetch(a, b)
	if resumes(t, a, client) {
		t.Error("a session resumed after its key's acceptance window")
	}

	client2 := client.Clone()
	client2.ClientSessionCache = tls.NewLRUClientSessionCache(8)
	if resumes(t, a, client2) {
		t.Fatal("first handshake resumed")
	}
	if resumes(t, other, client2) {
		t.Error("a session resumed on an edge of another group")
	}
}

// resumes makes one TLS connection from client to server and reports
// whether it resumed a session. It reads one byte so that the client
// takes the server's session tickets.
func resumes(t *testing.T, server, client *tls.Config) bool {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	errc := make(chan error, 1)
	go func() {
		raw, err := ln.Accept()
		if err != nil {
			errc <- err
			return
		}
		s := tls.Server(raw, server)
		defer s.Close()
		_ = s.SetDeadline(time.Now().Add(10 * time.Second))
		if err := s.Handshake(); err != nil {
			errc <- err
			return
		}
		_, err = s.Write([]byte{1})
		errc <- err
	}()
	c, err := tls.Dial("tcp", ln.Addr().String(), client)
	if err != nil {
		t.Fatalf("client: %v", err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err != nil {
		t.Fatalf("client: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("server: %v", err)
	}
	return c.ConnectionState().DidResume
}

func selfSigned(t *testing.T) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), DNSNames: []string{"edge.test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(der)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
}

// TestTicketFetcherRun lets Run fetch, then retry after a failure.
func TestTicketFetcherRun(t *testing.T) {
	clock := &fakeClock{t: time.Now()}
	src := &derivedSource{keys: mustTicketKeys(t, time.Hour, time.Hour), group: "eu", clock: clock}
	src.fail(errors.New("not yet"))
	rec := &keyRecorder{}
	f := newTestFetcher(t, src, rec, clock)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { defer close(done); f.Run(ctx) }()
	defer func() { cancel(); <-done }()
	time.Sleep(50 * time.Millisecond)
	if rec.last() != nil {
		t.Fatal("keys installed while the keyserver failed")
	}
	clock.add(2 * time.Second) // past the first retry
	src.fail(nil)
	deadline := time.Now().Add(10 * time.Second)
	for rec.last() == nil {
		if time.Now().After(deadline) {
			t.Fatal("Run did not retry a failed fetch")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if len(rec.last()) != 3 { // current, next, previous
		t.Errorf("Run installed %d keys, want 3", len(rec.last()))
	}
}
