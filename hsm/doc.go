// Package hsm serves TLS private keys that live in a PKCS #11 token (an
// HSM) as [crypto.Signer] values. [Open] logs in to a token described by a
// [Config] and finds its key pairs; the resulting [Module] satisfies
// package signer's KeyStore interface, structurally, and is the only code
// in the repository that uses PKCS #11 (through crypto11 and
// miekg/pkcs11). It knows about PINs, slots and sessions and nothing about
// gRPC or TLS connections.
//
// # Keys
//
// Every private key object on the token with CKA_SIGN true becomes a key if
// it is RSA (2048 to 4096 bits), ECDSA (P-256, P-384 or P-521) or Ed25519,
// its public key can be found (from the RSA private key's own modulus, or
// from the public key object with the same CKA_ID or, lacking an ID, the
// same CKA_LABEL) and, unless [Config.AllowExtractable] is set, it is
// CKA_SENSITIVE and not CKA_EXTRACTABLE. Other keys are skipped with a
// warning in the log. Keys made by other tools, such as
// `pkcs11-tool --keypairgen`, qualify; [Module.Generate] makes new ones.
// A key's id is the SHA-256 of its DER SubjectPublicKeyInfo.
//
// Besides crypto.Signer, each key has the methods
//
//	SignContext(ctx context.Context, digest []byte, opts crypto.SignerOpts) ([]byte, error)
//	SignatureSchemes() []tls.SignatureScheme
//	Label() string     // CKA_LABEL
//	ObjectID() []byte  // CKA_ID
//
// and RSA keys whose token and attributes allow decryption also have
//
//	DecryptPremaster(ctx context.Context, ciphertext []byte) ([]byte, error)
//
// ECDSA and Ed25519 keys are of other types, without a Decrypt method,
// because crypto/tls refuses a decrypting key whose public key is not RSA.
// Keys are immutable and safe for concurrent use.
//
// # Guarantees
//
// A signature leaves the package only after it has been verified with the
// key's public key (rsa.VerifyPSS, rsa.VerifyPKCS1v15, ecdsa.VerifyASN1,
// ed25519.Verify): a faulty RSA-CRT signature would reveal the private key.
// A failed check is an error wrapping [ErrFaultySignature].
//
// Requests are checked before they reach the token, because crypto11 does
// not check them: RSA and ECDSA sign only SHA-256, SHA-384 and SHA-512
// digests of exactly the hash's size (never SHA-1 or MD5), RSA-PSS only
// with a salt as long as the hash, Ed25519 only the whole message (pure
// Ed25519, no hash), and only with schemes the key's SignatureSchemes list.
// That list holds what the token can really do for the key, from the
// mechanisms it reports (CKM_RSA_PKCS_PSS, CKM_RSA_PKCS, CKM_ECDSA,
// CKM_EDDSA, within their key sizes) and the key's CKA_ALLOWED_MECHANISMS.
//
// DecryptPremaster implements implicit rejection: whatever the ciphertext,
// its answer is 48 bytes and no error, and an invalid ciphertext gets random
// bytes in about the same time as a valid one gets the premaster secret.
// It decrypts with raw RSA (CKM_RSA_X_509) and checks the PKCS #1 v1.5
// padding in constant time; tokens without raw RSA fall back to
// CKM_RSA_PKCS with every ciphertext-dependent error masked, which Open
// warns about. There is no other decryption, and raw RSA results never
// leave the package.
//
// Every key operation can be bounded by a context. PKCS #11 calls cannot be
// interrupted, so they run in a goroutine; when the context ends first the
// caller gets ctx.Err() at once and the call finishes in the background.
// Waits for a session are bounded by [Config.PoolWaitTimeout].
//
// The PIN is never logged and never part of an error, and a [Config]
// printed with package fmt shows it redacted.
//
// # Trust
//
// The package trusts the PKCS #11 module and the token to keep private keys
// secret and to perform the operations they report. It does not trust them
// to produce correct signatures (they are verified), to refuse malformed
// requests (they are checked first) or to check RSA padding in constant
// time (it does that itself when the token offers raw RSA). It trusts its
// callers with the keys: any caller may use any key; authorisation belongs
// to package signer.
//
// # Sessions and faults
//
// Each Module has two bounded session pools: crypto11's, for RSA and ECDSA
// signing and generation, and its own, for premaster decryption, Ed25519,
// key discovery and health checks. The module's own sessions recover from
// a closed session or a lost login by opening a new session or logging in
// again. crypto11's sessions do not recover, and tokens invalidate every
// object handle when all sessions of the application close. So an
// operation that meets such a fault (CKR_SESSION_HANDLE_INVALID,
// CKR_OBJECT_HANDLE_INVALID, CKR_USER_NOT_LOGGED_IN, CKR_DEVICE_REMOVED and
// the like) marks the module faulty, and the next [Module.Check] (which
// also probes the sessions and a key handle itself) or [Module.Refresh]
// reconnects: a new crypto11 context, fresh sessions and a new scan of the
// token. Keys obtained before a reconnection stop working and must be
// looked up again; package signer looks keys up for every request.
//
// PKCS #11 library state is global to a process, and crypto11 finalises a
// library whenever one of its contexts fails to open, even while others use
// it. Open therefore finds the token and checks the PIN itself before it
// hands over to crypto11, and keeps a process-wide count of open Modules
// per library. The library must not be initialised by code outside this
// package.
//
// # Testing
//
// Package hsm/hsmtest creates SoftHSM tokens for tests.
package hsm
