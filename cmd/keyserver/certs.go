package main

import (
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/keyless-tls/keyless/link"
)

// certificateNames reads the certificate files in dir (*.pem and *.crt; the
// first CERTIFICATE block of each is the leaf) and maps each leaf's key id
// to its DNS names, for the policy's cert: patterns. Files hold public
// certificates only: a file with a private key is an error, as is one
// without a certificate.
func certificateNames(dir string) (map[link.KeyID][]string, error) {
	des, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	names := make(map[link.KeyID][]string)
	for _, de := range des {
		name := de.Name()
		ext := strings.ToLower(filepath.Ext(name))
		if strings.HasPrefix(name, ".") || (ext != ".pem" && ext != ".crt") {
			continue
		}
		path := filepath.Join(dir, name)
		if fi, err := os.Stat(path); err != nil {
			return nil, err
		} else if !fi.Mode().IsRegular() {
			continue
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return nil, err
		}
		var leaf *x509.Certificate
		for rest := data; ; {
			var b *pem.Block
			if b, rest = pem.Decode(rest); b == nil {
				break
			}
			if strings.HasSuffix(b.Type, "PRIVATE KEY") {
				return nil, fmt.Errorf("%s holds a private key (PEM block %q); give the keyserver certificates only", path, b.Type)
			}
			if b.Type == "CERTIFICATE" && leaf == nil {
				if leaf, err = x509.ParseCertificate(b.Bytes); err != nil {
					return nil, fmt.Errorf("%s: %w", path, err)
				}
			}
		}
		if leaf == nil {
			return nil, fmt.Errorf("%s: no CERTIFICATE PEM block", path)
		}
		id, err := link.KeyIDOf(leaf.PublicKey)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		names[id] = append(names[id], leaf.DNSNames...)
	}
	return names, nil
}
