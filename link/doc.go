// Package link is what both ends of the edge–keyserver link share, and
// nothing else: the wire's vocabulary beyond the generated protobuf code.
// The edge (package tlscore) and the keyserver (package signer) each import
// it and never each other.
//
// It holds:
//
//   - key ids ([KeyID], [KeyIDOf]): the SHA-256 of a key's
//     SubjectPublicKeyInfo, computed alike from a certificate on the edge
//     and from a token's public key on the keyserver;
//   - the algorithm table ([Algorithm], [AlgorithmFor], [AlgorithmForOpts]):
//     which TLS signature scheme means which key type and
//     [crypto.SignerOpts], in both directions;
//   - the protocol's limits ([MaxRequestSize], [MaxStreamOperations],
//     [MaxContextFieldLen], [PremasterLen], …) and transport options
//     ([ServerOptions], [DialOptions]);
//   - the link's mutual TLS 1.3 credentials for both ends
//     ([LoadMTLSCredentials], [MTLSCredentials.ServerCredentials],
//     [MTLSCredentials.ClientConfig]), reloadable in place.
//
// It needs no cgo and knows nothing of HSMs, policies or certificates
// served to TLS clients.
package link
