package main

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/keyless-tls/keyless/signer"
)

// certificateFiles reads the certificate files in dir (*.pem and *.crt; the
// first CERTIFICATE block of each is the leaf), for the policy's cert:
// patterns. Files hold public certificates only: a file with a private key
// is an error. A file that cannot be read, has no CERTIFICATE block or
// whose certificate does not parse is returned with its Err set, so that
// the policy's Lint warns about it by name and its names count for
// nothing: a broken file must not stop a reload, which may be an emergency
// stop. Lint also checks the validity dates and the key of each usable one.
func certificateFiles(dir string) ([]signer.CertificateFile, error) {
	des, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var files []signer.CertificateFile
	for _, de := range des {
		name := de.Name()
		ext := strings.ToLower(filepath.Ext(name))
		if strings.HasPrefix(name, ".") || (ext != ".pem" && ext != ".crt") {
			continue
		}
		path := filepath.Join(dir, name)
		if fi, err := os.Stat(path); err != nil {
			files = append(files, signer.CertificateFile{Path: path, Err: err})
			continue
		} else if !fi.Mode().IsRegular() {
			continue
		}
		f, err := readCertificateFile(path)
		if err != nil {
			return nil, err
		}
		files = append(files, f)
	}
	return files, nil
}

// readCertificateFile reads one file of -certs. Only a private key in it
// is an error; other problems are the file's Err.
func readCertificateFile(path string) (signer.CertificateFile, error) {
	f := signer.CertificateFile{Path: path}
	data, err := os.ReadFile(path)
	if err != nil {
		f.Err = err
		return f, nil
	}
	var leafErr error
	for rest := data; ; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		if strings.HasSuffix(b.Type, "PRIVATE KEY") {
			return f, fmt.Errorf("%s holds a private key (PEM block %q); give the keyserver certificates only", path, b.Type)
		}
		if b.Type == "CERTIFICATE" && f.Leaf == nil && leafErr == nil {
			f.Leaf, leafErr = x509.ParseCertificate(b.Bytes)
		}
	}
	switch {
	case leafErr != nil:
		f.Leaf, f.Err = nil, fmt.Errorf("the certificate does not parse: %w", leafErr)
	case f.Leaf == nil:
		f.Err = errors.New("no CERTIFICATE PEM block")
	}
	return f, nil
}
