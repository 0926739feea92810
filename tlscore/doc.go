// Package tlscore is the core of a keyless TLS edge: it terminates TLS with
// crypto/tls for many host names while every private-key operation is
// performed by a keyserver over gRPC with mutual TLS 1.3.
//
// An edge is wired in five steps (see the example of [NewServerTLSConfig]):
// [link.ClientMTLSConfig] reads the edge's credentials for the keyserver link,
// [Dial] returns a [Client] for the keyservers, [CertStore.Load] reads the
// certificates and matches them with the keyserver's keys,
// [NewServerTLSConfig] builds the edge's tls.Config, and [ServeHTTP] (with a
// [Proxy] of routes to origins) or [ServeTCP] serves it. With
// [CertStoreConfig.OCSP], [CertStore.RunOCSP] keeps verified OCSP responses
// stapled.
//
// It shares nothing with the keyserver's code but package link, the wire's
// vocabulary: key ids, the algorithm table (which TLS signature scheme
// means which [crypto.SignerOpts]), the protocol's limits and the link's
// mutual-TLS credentials.
//
// # Trust and guarantees
//
// The edge holds no private key. [CertStore.Load] refuses any certificate file
// that contains a PRIVATE KEY PEM block, and the keys it serves are
// [RemoteKey] values whose operations are RPCs. Every RPC carries a deadline
// ([ClientConfig.CallTimeout], or the caller's own if sooner), so a slow or
// dead keyserver fails a handshake within that deadline; it never hangs it.
//
// A [RemoteKey] for an RSA key is a [crypto.Signer] and a [crypto.Decrypter];
// ECDSA and Ed25519 keys are [crypto.Signer] only, because crypto/tls treats
// any Decrypter as an RSA key-exchange key. RSA decryption is offered only for
// the TLS 1.2 premaster secret and relies on the keyserver's implicit
// rejection: a bad ciphertext yields 48 bytes unpredictable without the key,
// the same each time, never an error, so neither the edge nor a client of it
// gets a padding oracle. The keyserver verifies RSA signatures before they
// leave it, because a faulty RSA-CRT signature reveals the private key; the
// edge does not check them again.
//
// Each full handshake costs a keyserver operation before the client has
// proved anything. [ServerConfig.MaxKeyOperations] bounds the operations in
// flight (by default) and [ServerConfig.HandshakesPerClient] each client
// address's full handshakes; a handshake over either is refused at once,
// before its operation reaches a keyserver.
//
// # Resumption
//
// Session tickets are on: a resumed handshake needs no key operation. Every
// ticket is sealed with the ticket keys of the [tls.Config] returned by
// [NewServerTLSConfig], whichever per-client configuration handled the
// handshake, so [tls.Config.SetSessionTicketKeys] on that config applies to
// all of them. Tickets are bound to the server name they were issued for: a
// ticket offered under another SNI is ignored and a full handshake follows.
//
// # Reload
//
// [CertStore.Load] and [link.MTLSCredentials.Reload] replace their state
// atomically: handshakes that have started finish with the old state, later
// ones use the new. A failed reload keeps the previous state.
package tlscore
