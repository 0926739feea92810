package signer

import (
	"context"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// OpTickets is a GetTicketKeys request: the session ticket keys of the
// caller's ticket group.
const OpTickets = "tickets"

// Defaults of [TicketConfig].
const (
	// DefaultTicketPeriod is how long one ticket key seals new tickets.
	DefaultTicketPeriod = time.Hour
	// DefaultTicketAccept is how long a ticket key still opens tickets
	// after it stopped sealing them.
	DefaultTicketAccept = 12 * time.Hour
)

// MinTicketSecretLen is the shortest ticket secret [NewTicketKeys] takes.
const MinTicketSecretLen = 32

// MaxTicketAcceptPeriods bounds TicketConfig.Accept, in periods, and so
// the keys one answer carries (at most this many plus two).
const MaxTicketAcceptPeriods = 254

// ErrNoTicketSecret is returned by GetTicketKeys on a keyserver that has
// no ticket secret; it becomes UNAVAILABLE.
var ErrNoTicketSecret = errors.New("signer: this keyserver has no session ticket secret (keyserver serve -ticket-secret-file)")

// TicketConfig configures [TicketKeys].
type TicketConfig struct {
	// Secret is the secret every ticket key is derived from: at least
	// MinTicketSecretLen random bytes, the same on every keyserver of a
	// deployment. It is copied; the caller may wipe its copy.
	Secret []byte
	// Period is how long each key seals new tickets; keys rotate at every
	// multiple of Period since the Unix epoch, at the same instants on
	// every keyserver. Zero means DefaultTicketPeriod. At least 1 s.
	Period time.Duration
	// Accept is how long a key still opens tickets after its period ends:
	// a session resumes at most Period + Accept after it was sealed. Zero
	// means DefaultTicketAccept; at most MaxTicketAcceptPeriods periods.
	Accept time.Duration
}

// TicketKeys derives the session ticket keys of each ticket group, for
// each period, from one secret: keyserver that share the secret and the
// period hand out the same keys, across restarts, and no key is ever
// stored. A key is HKDF-SHA-256 (RFC 5869) of the secret, with the group's
// name, the period's number (Unix time / Period) and Period itself in the
// info, so that each group and each period has its own key and a key
// tells nothing about another. It is immutable and safe for concurrent use.
type TicketKeys struct {
	secret []byte
	period time.Duration
	accept time.Duration
}

// NewTicketKeys returns TicketKeys for cfg, or an error naming the field
// that is out of range. The error never contains secret bytes.
func NewTicketKeys(cfg TicketConfig) (*TicketKeys, error) {
	t := &TicketKeys{secret: append([]byte(nil), cfg.Secret...), period: cfg.Period, accept: cfg.Accept}
	if t.period == 0 {
		t.period = DefaultTicketPeriod
	}
	if t.accept == 0 {
		t.accept = DefaultTicketAccept
	}
	switch {
	case len(cfg.Secret) < MinTicketSecretLen:
		return nil, &ConfigError{Field: "TicketConfig.Secret", Value: fmt.Sprintf("%d bytes", len(cfg.Secret)), Want: fmt.Sprintf("at least %d random bytes", MinTicketSecretLen)}
	case t.period < time.Second || t.period%time.Millisecond != 0:
		return nil, &ConfigError{Field: "TicketConfig.Period", Value: t.period, Want: "at least 1s, in whole milliseconds"}
	case t.accept < 0 || t.accept > MaxTicketAcceptPeriods*t.period:
		return nil, &ConfigError{Field: "TicketConfig.Accept", Value: t.accept, Want: fmt.Sprintf("0 or more, at most %d periods", MaxTicketAcceptPeriods)}
	}
	return t, nil
}

// Period returns how long each key seals new tickets.
func (t *TicketKeys) Period() time.Duration { return t.period }

// Accept returns how long a key opens tickets after its period.
func (t *TicketKeys) Accept() time.Duration { return t.accept }

// Keys returns the ticket keys of group at now, newest first: the next
// period's key, the current one, then every earlier one still accepted.
func (t *TicketKeys) Keys(group string, now time.Time) (*keylessv1.GetTicketKeysResponse, error) {
	p := t.period.Milliseconds()
	ms := now.UnixMilli()
	if ms < 0 {
		return nil, fmt.Errorf("signer: ticket keys: clock before 1970 (%v)", now)
	}
	cur := ms / p
	resp := &keylessv1.GetTicketKeysResponse{Group: group, RefreshUnixMs: (cur + 1) * p}
	for e := cur + 1; e >= 0; e-- {
		k := &keylessv1.TicketKey{
			NotBeforeUnixMs:   e * p,
			SealUntilUnixMs:   (e + 1) * p,
			AcceptUntilUnixMs: (e+1)*p + t.accept.Milliseconds(),
		}
		if k.AcceptUntilUnixMs <= ms {
			break
		}
		key, err := t.derive(group, e)
		if err != nil {
			return nil, err
		}
		k.Key = key
		resp.Keys = append(resp.Keys, k)
	}
	return resp, nil
}

// derive returns the key of group for period number epoch.
func (t *TicketKeys) derive(group string, epoch int64) ([]byte, error) {
	info := make([]byte, 0, 32+len(group))
	info = append(info, "keyless session ticket key v1\x00"...)
	info = binary.BigEndian.AppendUint64(info, uint64(t.period.Milliseconds()))
	info = binary.BigEndian.AppendUint64(info, uint64(epoch))
	info = append(info, group...)
	key, err := hkdf.Key(sha256.New, t.secret, nil, string(info), 32)
	if err != nil {
		// Not err's text: it cannot hold the secret, but say only what failed.
		return nil, errors.New("signer: ticket key derivation failed")
	}
	return key, nil
}

// GetTicketKeys implements KeylessService.GetTicketKeys: the ticket keys
// of the caller's ticket group, the first policy rule that allows the
// caller the tickets operation. Its audit record has op "tickets", the
// caller, the rule and the outcome; never a key.
func (s *Service) GetTicketKeys(ctx context.Context, _ *keylessv1.GetTicketKeysRequest) (*keylessv1.GetTicketKeysResponse, error) {
	c, finish := s.begin(ctx, OpTickets)
	resp, err := s.ticketKeys(ctx, c)
	if err = s.answer(c, finish, err); err != nil {
		return nil, err
	}
	return resp, nil
}

func (s *Service) ticketKeys(ctx context.Context, c *call) (*keylessv1.GetTicketKeysResponse, error) {
	pol, identity, release, err := s.start(ctx, c)
	if err != nil {
		return nil, err
	}
	defer release()
	if c.rule, err = pol.authorizeTickets(identity); err != nil {
		return nil, err
	}
	if s.tickets == nil {
		return nil, ErrNoTicketSecret
	}
	return s.tickets.Keys(c.rule, time.Now())
}

// authorizeTickets returns the name of the first rule that allows
// identity the tickets operation: the ticket group, whose members share
// ticket keys. Otherwise the error is a *PermissionError.
func (p *Policy) authorizeTickets(identity string) (string, error) {
	for _, r := range p.rules {
		if r.tickets && r.identities[identity] {
			return r.name, nil
		}
	}
	return "", &PermissionError{Identity: identity,
		Reason: fmt.Sprintf("no rule of policy %s allows identity %q the tickets operation (session ticket keys)", p.source, identity)}
}

// TicketGroups returns the names of the rules that allow the tickets
// operation: the ticket groups, in file order.
func (p *Policy) TicketGroups() []string {
	var out []string
	for _, r := range p.rules {
		if r.tickets {
			out = append(out, r.name)
		}
	}
	return out
}
