package link

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"time"
)

// ErrRevoked is the reason a client certificate listed by a CRL of
// [MTLSCredentials.SetClientCRLs] is refused, in the handshake
// (*[ClientRefusedError]) and on connections opened before the CRL was
// loaded.
var ErrRevoked = errors.New("the client certificate is revoked by a CRL")

// revocations is the set of certificates the loaded CRLs revoke. It is
// immutable.
type revocations struct {
	// revoked holds issuer || serial of every revoked certificate.
	revoked map[string]struct{}
	crls    []loadedCRL
}

// loadedCRL is one CRL as loaded, for the report of expired ones.
type loadedCRL struct {
	file       string
	nextUpdate time.Time
}

func revocationKey(rawIssuer []byte, serial []byte) string {
	return string(rawIssuer) + "\x00" + string(serial)
}

// has reports whether cert is revoked.
func (r *revocations) has(cert *x509.Certificate) bool {
	if r == nil || len(r.revoked) == 0 {
		return false
	}
	_, ok := r.revoked[revocationKey(cert.RawIssuer, cert.SerialNumber.Bytes())]
	return ok
}

// loadRevocations reads the CRLs of files, PEM ("X509 CRL" blocks, several
// per file allowed) or DER, and checks that each is signed by a CA
// certificate of cas. Errors name the file and the problem.
func loadRevocations(files []string, cas []*x509.Certificate) (*revocations, error) {
	r := &revocations{revoked: make(map[string]struct{})}
	for _, file := range files {
		data, err := os.ReadFile(file)
		if err != nil {
			return nil, fmt.Errorf("link: client CRL file: %w", err)
		}
		ders, err := crlDERs(data)
		if err != nil {
			return nil, fmt.Errorf("link: client CRL file %q: %w", file, err)
		}
		for i, der := range ders {
			crl, err := x509.ParseRevocationList(der)
			if err != nil {
				return nil, fmt.Errorf("link: client CRL file %q: CRL %d: %w", file, i+1, err)
			}
			if err := checkCRLIssuer(crl, cas); err != nil {
				return nil, fmt.Errorf("link: client CRL file %q: CRL %d: %w", file, i+1, err)
			}
			for _, e := range crl.RevokedCertificateEntries {
				r.revoked[revocationKey(crl.RawIssuer, e.SerialNumber.Bytes())] = struct{}{}
			}
			r.crls = append(r.crls, loadedCRL{file: file, nextUpdate: crl.NextUpdate})
		}
	}
	return r, nil
}

// crlDERs returns the DER CRLs of a file: its "X509 CRL" PEM blocks, or the
// whole file if it is not PEM.
func crlDERs(data []byte) ([][]byte, error) {
	if !bytes.Contains(data, []byte("-----BEGIN")) {
		return [][]byte{data}, nil
	}
	var ders [][]byte
	for rest := data; ; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		if b.Type == "X509 CRL" {
			ders = append(ders, b.Bytes)
		}
	}
	if len(ders) == 0 {
		return nil, errors.New(`no "X509 CRL" PEM block found`)
	}
	return ders, nil
}

// checkCRLIssuer returns an error unless a CA certificate of cas signed crl.
func checkCRLIssuer(crl *x509.RevocationList, cas []*x509.Certificate) error {
	var lastErr error
	for _, ca := range cas {
		if !bytes.Equal(ca.RawSubject, crl.RawIssuer) {
			continue
		}
		if lastErr = crl.CheckSignatureFrom(ca); lastErr == nil {
			return nil
		}
	}
	if lastErr != nil {
		return fmt.Errorf("not signed by the client CA: %w", lastErr)
	}
	return errors.New("not issued by a certificate of the client CA file")
}

// ExpiredClientCRLs returns the files of the loaded client CRLs whose next
// update is past at now. The keyserver keeps using an expired CRL (a stale
// list of revoked certificates is better than none) and reports it.
func (c *MTLSCredentials) ExpiredClientCRLs(now time.Time) []string {
	m := c.cur.Load()
	var out []string
	for _, l := range m.revoked.crls {
		if !l.nextUpdate.IsZero() && now.After(l.nextUpdate) {
			out = append(out, l.file)
		}
	}
	return out
}

// Revoked reports whether a CRL of [MTLSCredentials.SetClientCRLs] revokes
// cert. It is cheap enough to ask at every request.
func (c *MTLSCredentials) Revoked(cert *x509.Certificate) bool {
	return c.cur.Load().revoked.has(cert)
}
