// Package signer is the keyserver's core: it identifies and authorizes the
// caller, validates requests, maps TLS signature schemes to key operations,
// and implements the KeylessService gRPC API over a [KeyStore], with an
// audit trail.
//
// It imports neither cgo nor PKCS #11: an HSM-backed store (package hsm)
// satisfies [KeyStore] structurally, and [MemoryStore] serves tests.
//
// # Who may do what
//
// A caller is identified by the verified client certificate of its mutual
// TLS connection: the first of its URI and DNS names ([CertificateNames])
// that the [Policy] names. A Policy, parsed from YAML by [ParsePolicy],
// says which identities (or groups of them) may use which keys (by key id,
// PKCS #11 label or certificate name), for which operations and signature
// schemes; everything else is denied (PermissionDenied, naming the rule).
// SHA-1 schemes are allowed only where a rule names them, and premaster
// decryption only where a rule names decrypt. [Service.CheckPeer] applies
// the same allow-list during the TLS handshake. Each identity also has a
// [Quota] of requests in flight and per second (ResourceExhausted), and
// key operations wait in one bounded queue for the key store.
//
// # Guarantees
//
// A Sign request reaches a key only from an identity the policy allows to
// use that key with that scheme, with a known scheme that suits the key's
// type and that the key's store says it can perform, and with a digest of
// exactly the scheme's hash size (for Ed25519, a message shaped like a TLS
// server signature input). A Decrypt request reaches only RSA keys that
// implement [PremasterDecrypter], for identities the policy lets decrypt
// with them; its contract is implicit rejection: its answer is 48 bytes
// and OK whatever the ciphertext, and for an invalid ciphertext the same 48
// bytes every time (see [PremasterDecrypter]), so that asking twice reveals
// nothing. There is no raw RSA operation.
//
// # Audit
//
// Every request produces one [AuditRecord], passed to the [Auditor] of the
// Config ([AuditLog] writes JSON lines), before the answer is sent; a
// result whose record cannot be written is not returned, and key
// operations are refused until records can be written again.
// [Service.StatsHandler] also records the requests gRPC refuses before a
// handler runs. Records hold no digest, signature, ciphertext, premaster
// or PIN, and a decryption answered by implicit rejection is recorded
// exactly like a valid one.
//
// # Errors
//
// Handlers return gRPC status errors, mapped in one place: malformed requests
// get InvalidArgument with a message naming the field, unknown keys and keys
// the caller's policy does not name NotFound (one message for both),
// other denials PermissionDenied naming the rule, a caller over its quota or a
// full queue ResourceExhausted, a store (or audit trail) that cannot be used
// Unavailable and an expired deadline DeadlineExceeded. Other failures are
// Internal with a generic message; their details go only to the log.
package signer
