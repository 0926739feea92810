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
//	Label() string              // CKA_LABEL
//	ObjectID() []byte           // CKA_ID
//	Attributes() KeyAttributes  // CKA_SENSITIVE, CKA_EXTRACTABLE, CKA_ALLOWED_MECHANISMS
//
// and RSA keys whose token and attributes allow decryption also have
//
//	DecryptPremaster(ctx context.Context, ciphertext []byte) ([]byte, error)
//	DecryptMechanism() string   // "CKM_RSA_X_509" or "CKM_RSA_PKCS"
//
// [Module.Delete] destroys a key in the token.
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
// its answer is 48 bytes and no error, and an invalid ciphertext gets, in
// about the same time as a valid one gets the premaster secret, bytes that
// only the key could compute and that are the same on every call (package
// premaster's rejection, keyed with the key's signature of a fixed message,
// which the key computes in the token on first use). Fresh random bytes
// would tell a caller who asks twice which ciphertexts were valid.
// It decrypts with raw RSA (CKM_RSA_X_509) and checks the PKCS #1 v1.5
// padding in constant time; tokens without raw RSA fall back to
// CKM_RSA_PKCS, where every return value of C_Decrypt counts as a padding
// failure except the few that mean the token, session, login or key is
// gone (an *[UnavailableError] for every ciphertext alike), and every
// answer is held until a time set by the key's recent decryptions, so
// that the token's padding check, which may take longer for some
// ciphertexts, does not set it; Open warns of the fallback. The only other
// decryption is of a fixed value, once per key, for its rejection secret,
// and raw RSA results never leave the package.
//
// Every key operation is bounded by its context. PKCS #11 calls cannot be
// interrupted, so they run in a goroutine; when the context ends first the
// caller gets ctx.Err() at once and the call finishes in the background,
// keeping its session and its call slot until it returns (see Bounded
// calls below). Waits for a session or a call slot are bounded by
// [Config.PoolWaitTimeout].
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
// object handle when all sessions of the application close.
//
// So a Module is supervised, by a goroutine that runs from Open to Close.
// An operation or a health check that meets a token fault
// (CKR_SESSION_HANDLE_INVALID, CKR_OBJECT_HANDLE_INVALID,
// CKR_USER_NOT_LOGGED_IN, CKR_DEVICE_REMOVED, CKR_TOKEN_NOT_PRESENT, a
// token that no longer answers C_GetTokenInfo, and the like) marks the
// module faulty. From then on every operation, [Module.Key], [Module.Keys]
// and [Module.Check] fail at once with an *[UnavailableError], without
// touching the token, and the supervisor reconnects: it checks the token
// and the PIN, opens a new crypto11 context and new sessions, and scans the
// token for keys again. It tries at once, then with exponential backoff
// from 100 ms up to [Config.MaxReconnectBackoff], but every 250 ms at most
// while the token is absent. [Module.Changed] reports each turn to faulty
// and back, so that a health reporter follows at once. Keys obtained
// before a reconnection stop working and must be looked up again; package
// signer looks keys up for every request.
//
// Some tokens stay unusable after a fault until the PKCS #11 library is
// initialised again: SoftHSM reads its token directory only in
// C_Initialize, and a token whose directory went away keeps failing even
// after it is back. When a plain reconnection fails because the token does
// not answer, the supervisor therefore finalises and initialises the
// library again (at most once a second per library). Other Modules of the
// process on the same library notice (every session and handle of theirs
// is dead) and reconnect too. Session handles from before are never closed
// afterwards, because the library may have given their numbers to new
// sessions.
//
// Some libraries give each C_GetFunctionList an instance of its own, with
// its own C_Initialize state and, for p11-kit's client (p11-kit-client.so,
// a token served by `p11-kit server`), its own connection. Open detects
// them (a fresh instance is uninitialised while the module's is
// initialised): the module then keeps its own instance initialised until
// Close, gives each crypto11 context a path of its own to the library (a
// symlink in a private temporary directory) so that crypto11 initialises
// and finalises only that context's instance, and initialises its own
// instance again at each reconnection attempt, which affects no other
// Module.
//
// Every [Config.RescanInterval] the supervisor scans the token, so keys
// that other applications add or remove are noticed and logged.
//
// # Bounded calls
//
// A key operation's PKCS #11 call takes one of MaxSessions-1 call slots and
// gives it back when the call returns, not when its caller gives up: a call
// that hangs in the token keeps its slot and its session, so hung calls
// never make the module open more sessions or run more calls in the token
// than that. A call that has run for longer than
// [Config.StuckCallThreshold] is logged as stuck (and again when it
// returns). While every slot is held by a stuck call, operations fail at
// once with an *[UnavailableError] and [Module.Check] fails, so that the
// keyserver reports NOT_SERVING and edges go elsewhere.
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
