package main

import (
	"fmt"

	"github.com/keyless-tls/keyless/tlscore"
)

// certOptions applies -require-all-certs and -ocsp-stapling to cfg and
// returns the client-certificate policies of -client-auth, reading their
// CA files.
func (f *flags) certOptions(cfg *tlscore.CertStoreConfig) ([]tlscore.ClientAuthPolicy, error) {
	cfg.RequireAll = f.requireAllCerts
	if f.ocspStapling {
		cfg.OCSP = &tlscore.OCSPConfig{}
	}
	policies, err := tlscore.ParseClientAuth(f.clientAuth)
	if err != nil {
		return nil, fmt.Errorf("-client-auth %w", err)
	}
	return policies, nil
}
