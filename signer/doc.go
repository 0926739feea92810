// Package signer is the keyserver's core: it validates requests, maps TLS
// signature schemes to key operations, and implements the KeylessService gRPC
// API over a [KeyStore].
//
// It imports neither cgo nor PKCS #11: an HSM-backed store (package hsm)
// satisfies [KeyStore] structurally, and [MemoryStore] serves tests.
//
// # Guarantees
//
// A Sign request reaches a key only with a known scheme that suits the key's
// type and that the key's store says it can perform, and with a digest of
// exactly the scheme's hash size (for Ed25519, a message shaped like a TLS
// server signature input). A Decrypt request reaches only RSA keys that
// implement [PremasterDecrypter], whose contract is implicit rejection: its
// answer is 48 bytes and OK whatever the ciphertext. There is no raw RSA
// operation.
//
// # Errors
//
// Handlers return gRPC status errors, mapped in one place: malformed requests
// get InvalidArgument with a message naming the field, unknown keys NotFound,
// a store that cannot answer Unavailable, a full queue ResourceExhausted and
// an expired deadline DeadlineExceeded. Other failures are Internal with a
// generic message; their details go only to the log.
package signer
