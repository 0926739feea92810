package main

import (
	"github.com/keyless-tls/keyless/tlscore"
)

// certOptions applies -require-all-certs and -ocsp-stapling to cfg and
// returns the client-certificate policies of -client-auth.
func (f *flags) certOptions(cfg *tlscore.CertStoreConfig) []tlscore.ClientAuthPolicy {
	cfg.RequireAll = f.requireAllCerts
	if f.ocspStapling {
		cfg.OCSP = &tlscore.OCSPConfig{}
	}
	return f.clientAuthPolicies
}
