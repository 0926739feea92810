package main

import (
	"context"
	"crypto"

	"github.com/keyless-tls/keyless/hsm"
	"github.com/keyless-tls/keyless/link"
	"github.com/keyless-tls/keyless/signer"
)

// uriKeys is a signer.KeyStore that serves only the keys of its store that
// a PKCS #11 URI's object= and id= attributes select. Every part of the
// keyserver (signing, the policy, health and readiness, the keys gauge,
// ListKeys) sees only those keys. It is a signer.Checker when the store
// is, and safe for concurrent use when the store is.
type uriKeys struct {
	store signer.KeyStore
	uri   *hsm.URI
}

var (
	_ signer.KeyStore = (*uriKeys)(nil)
	_ signer.Checker  = (*uriKeys)(nil)
)

// newKeyStore returns store itself when the URI (which may be nil) names
// no keys, or else store filtered by the URI.
func newKeyStore(store signer.KeyStore, uri *hsm.URI) signer.KeyStore {
	if uri == nil || !uri.SelectsKeys() {
		return store
	}
	return &uriKeys{store: store, uri: uri}
}

func (s *uriKeys) match(k crypto.Signer) bool {
	d, ok := k.(signer.Describer)
	return ok && s.uri.MatchKey(d.Label(), d.ObjectID())
}

// Key returns the key whose id is id if the URI selects it, or (nil, nil).
func (s *uriKeys) Key(ctx context.Context, id link.KeyID) (crypto.Signer, error) {
	k, err := s.store.Key(ctx, id)
	if err != nil || k == nil || !s.match(k) {
		return nil, err
	}
	return k, nil
}

// Keys returns the keys of the store that the URI selects.
func (s *uriKeys) Keys(ctx context.Context) ([]crypto.Signer, error) {
	all, err := s.store.Keys(ctx)
	if err != nil {
		return nil, err
	}
	var keys []crypto.Signer
	for _, k := range all {
		if s.match(k) {
			keys = append(keys, k)
		}
	}
	return keys, nil
}

// Check is the store's Check, or nil when the store is not a Checker.
func (s *uriKeys) Check(ctx context.Context) error {
	if c, ok := s.store.(signer.Checker); ok {
		return c.Check(ctx)
	}
	return nil
}
