package tlscore

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"slices"

	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// RemoteKey is a private key held by a keyserver, usable as
// tls.Certificate.PrivateKey. Its operations are calls through a [Client],
// each bounded by the client's call timeout.
//
// A RemoteKey for an RSA key that the keyserver can decrypt premaster
// secrets with also implements [crypto.Decrypter]; no other RemoteKey does,
// because crypto/tls takes any Decrypter for an RSA key-exchange key.
//
// RemoteKeys are immutable and safe for concurrent use.
type RemoteKey interface {
	crypto.Signer
	// KeyID returns the key's id: the SHA-256 of its SubjectPublicKeyInfo.
	KeyID() link.KeyID
	// WithContext returns a copy of the key whose calls use ctx (plus the
	// call timeout) and carry rc to the keyserver's audit trail. Bind a key
	// to ClientHelloInfo.Context() so that a handshake's key operations end
	// with the handshake. A key not so bound uses context.Background().
	WithContext(ctx context.Context, rc *keylessv1.RequestContext) RemoteKey
}

// NewRemoteKey returns the key that info describes, as the keyserver's
// ListKeys reports it, operated through c. It checks that info.KeyId is the
// SHA-256 of info.PublicKey and that info.Type matches the public key. The
// key performs only the signature schemes info lists, and decrypts only if
// it is an RSA key with info.DecryptPremaster set.
func NewRemoteKey(c *Client, info *keylessv1.Key) (RemoteKey, error) {
	k, err := newRemoteKey(c, info)
	if err != nil {
		return nil, fmt.Errorf("%w", err)
	}
	return k, nil
}

// newRemoteKey is NewRemoteKey, with errors that do not name the package.
func newRemoteKey(c *Client, info *keylessv1.Key) (RemoteKey, error) {
	if c == nil {
		return nil, errors.New("NewRemoteKey: nil client")
	}
	if info == nil {
		return nil, errors.New("NewRemoteKey: nil key description")
	}
	sum := sha256.Sum256(info.GetPublicKey())
	if !bytes.Equal(sum[:], info.GetKeyId()) {
		return nil, fmt.Errorf("key %x: the key id is not the SHA-256 of the public key", info.GetKeyId())
	}
	id := link.KeyID(sum)
	pub, err := x509.ParsePKIXPublicKey(info.GetPublicKey())
	if err != nil {
		return nil, fmt.Errorf("key %s: parse public key: %w", link.FormatKeyID(id), err)
	}
	kt := link.KeyTypeOf(pub)
	switch {
	case kt == keylessv1.KeyType_KEY_TYPE_UNSPECIFIED:
		return nil, fmt.Errorf("key %s: unsupported public key type %T", link.FormatKeyID(id), pub)
	case info.GetType() != keylessv1.KeyType_KEY_TYPE_UNSPECIFIED && info.GetType() != kt:
		return nil, fmt.Errorf("key %s: described as %v but the public key is %v", link.FormatKeyID(id), info.GetType(), kt)
	}
	k := remoteKey{client: c, id: id, pub: pub}
	for _, w := range info.GetSignatureAlgorithms() {
		if a, ok := link.AlgorithmFor(w); ok && a.KeyType == kt && !slices.Contains(k.algs, w) {
			k.algs = append(k.algs, w)
		}
	}
	if _, isRSA := pub.(*rsa.PublicKey); isRSA && info.GetDecryptPremaster() {
		return &remoteRSAKey{k}, nil
	}
	return &k, nil
}

// remoteKey is a Signer only: every ECDSA and Ed25519 key, and RSA keys that
// cannot decrypt.
type remoteKey struct {
	client *Client
	id     link.KeyID
	pub    crypto.PublicKey
	algs   []keylessv1.SignatureAlgorithm // what the keyserver offers for the key

	ctx context.Context // nil means context.Background()
	rc  *keylessv1.RequestContext
}

// remoteRSAKey is an RSA key that is also a premaster Decrypter.
type remoteRSAKey struct{ remoteKey }

var (
	_ RemoteKey        = (*remoteKey)(nil)
	_ RemoteKey        = (*remoteRSAKey)(nil)
	_ crypto.Decrypter = (*remoteRSAKey)(nil)
)

// Public returns the public key.
func (k *remoteKey) Public() crypto.PublicKey { return k.pub }

// KeyID returns the key's id.
func (k *remoteKey) KeyID() link.KeyID { return k.id }

// WithContext implements [RemoteKey].
func (k *remoteKey) WithContext(ctx context.Context, rc *keylessv1.RequestContext) RemoteKey {
	c := *k
	c.ctx, c.rc = ctx, rc
	return &c
}

// WithContext implements [RemoteKey]; the copy is still a Decrypter.
func (k *remoteRSAKey) WithContext(ctx context.Context, rc *keylessv1.RequestContext) RemoteKey {
	c := *k
	c.ctx, c.rc = ctx, rc
	return &c
}

func (k *remoteKey) context() context.Context {
	if k.ctx == nil {
		return context.Background()
	}
	return k.ctx
}

// Sign signs digest as crypto/tls asks: a digest of opts.HashFunc() for RSA
// (PKCS #1 v1.5, or PSS when opts is *rsa.PSSOptions with a salt as long as
// the hash) and ECDSA, the whole message with crypto.Hash(0) for Ed25519.
// rand is ignored: the keyserver has its own. The scheme must be one the
// keyserver offers for the key. The keyserver verifies RSA signatures
// before they leave it (a faulty RSA-CRT signature reveals the key), so the
// edge does not check them again.
func (k *remoteKey) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	alg, err := link.AlgorithmForOpts(k.pub, opts)
	if err != nil {
		return nil, fmt.Errorf("tlscore: key %s: %w", link.FormatKeyID(k.id), err)
	}
	if !slices.Contains(k.algs, alg.Wire) {
		return nil, fmt.Errorf("tlscore: key %s: the keyserver does not offer %v for this key", link.FormatKeyID(k.id), alg)
	}
	if alg.Hash != 0 && len(digest) != alg.Hash.Size() {
		return nil, fmt.Errorf("tlscore: key %s: %d-byte digest for %v; want %d", link.FormatKeyID(k.id), len(digest), alg, alg.Hash.Size())
	}
	return k.client.Sign(k.context(), k.id, alg, digest, k.rc)
}

// Decrypt decrypts a TLS 1.2 RSA key exchange: opts must be
// *rsa.PKCS1v15DecryptOptions with SessionKeyLen 48, as crypto/tls passes;
// anything else is refused without a call. The result is 48 bytes: the
// premaster secret, or bytes unpredictable without the key if the
// ciphertext is invalid (implicit rejection, done by the keyserver), so
// that the handshake fails later, at Finished, the same way for every bad
// ciphertext. An error means the keyserver could not be used, never that
// the ciphertext was bad. rand is ignored.
func (k *remoteRSAKey) Decrypt(_ io.Reader, ciphertext []byte, opts crypto.DecrypterOpts) ([]byte, error) {
	o, ok := opts.(*rsa.PKCS1v15DecryptOptions)
	if !ok || o == nil || o.SessionKeyLen != link.PremasterLen {
		return nil, fmt.Errorf("tlscore: key %s: only TLS premaster decryption (*rsa.PKCS1v15DecryptOptions with SessionKeyLen %d) is supported, not %T",
			link.FormatKeyID(k.id), link.PremasterLen, opts)
	}
	return k.client.Decrypt(k.context(), k.id, ciphertext, k.rc)
}
