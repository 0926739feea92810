package bench

import (
	"bufio"
	"context"
	"crypto"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/keyless-tls/keyless/link"
	"github.com/keyless-tls/keyless/signer"
	"github.com/keyless-tls/keyless/tlscore"
)

// Host names of the bench's web certificates.
const (
	nameECDSA = "ecdsa.bench.test"
	nameRSA   = "rsa.bench.test"
)

// runTLSServer is the "tls-server" mode: a crypto/tls HTTPS server holding
// its keys in this process, either in the SoftHSM token through package hsm
// (-keys hsm) or as software keys read from files (-keys soft). It is
// configured as the edge is (TLS 1.2 and 1.3, the same suites, session
// tickets, ALPN h2 and http/1.1), prints "ready ADDR" and serves until its
// standard input closes, it is signalled, or -lifetime passes.
func runTLSServer(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	fs := newFlagSet("tls-server", stderr)
	var (
		hf       hsmFlags
		listen   = fs.String("listen", "127.0.0.1:0", "address to listen on")
		certs    = fs.String("certs", "", "directory of NAME.pem certificate chains (required)")
		keys     = fs.String("keys", "soft", "where the keys are: soft (NAME.key files next to the certificates) or hsm (the token)")
		lifetime = fs.Duration("lifetime", 15*time.Minute, "exit after this long whatever happens")
	)
	hf.register(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	var find func(name string, leaf *x509.Certificate) (crypto.Signer, []tls.SignatureScheme, error)
	switch *keys {
	case "soft":
		find = func(name string, _ *x509.Certificate) (crypto.Signer, []tls.SignatureScheme, error) {
			c, err := tls.LoadX509KeyPair(filepath.Join(*certs, name+".pem"), filepath.Join(*certs, name+".key"))
			if err != nil {
				return nil, nil, err
			}
			return c.PrivateKey.(crypto.Signer), nil, nil
		}
	case "hsm":
		m, err := hf.open()
		if err != nil {
			return err
		}
		defer m.Close()
		find = func(_ string, leaf *x509.Certificate) (crypto.Signer, []tls.SignatureScheme, error) {
			id, err := link.KeyIDOf(leaf.PublicKey)
			if err != nil {
				return nil, nil, err
			}
			k, err := m.Key(ctx, id)
			if err != nil || k == nil {
				return nil, nil, fmt.Errorf("bench: no key %s on the token (%v)", link.FormatKeyID(id), err)
			}
			return hsmTLSKey(k), tlsSchemes(signer.Schemes(k)), nil
		}
	default:
		return fmt.Errorf("bench: -keys %q: want soft or hsm", *keys)
	}
	byName := make(map[string]*tls.Certificate)
	for _, name := range []string{nameECDSA, nameRSA} {
		data, err := os.ReadFile(filepath.Join(*certs, name+".pem"))
		if err != nil {
			return err
		}
		cert, err := parseChain(data)
		if err != nil {
			return fmt.Errorf("bench: %s: %w", name, err)
		}
		key, schemes, err := find(name, cert.Leaf)
		if err != nil {
			return err
		}
		cert.PrivateKey, cert.SupportedSignatureAlgorithms = key, schemes
		byName[name] = cert
	}
	cfg := &tls.Config{
		MinVersion:   tls.VersionTLS12,
		CipherSuites: tlscore.CipherSuites(true),
		NextProtos:   []string{"h2", "http/1.1"},
		GetCertificate: func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
			if c, ok := byName[strings.ToLower(hello.ServerName)]; ok {
				return c, nil
			}
			return byName[nameECDSA], nil
		},
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	srv := &http.Server{
		Handler:           okHandler(),
		TLSConfig:         cfg,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          log.New(io.Discard, "", 0),
	}
	served := make(chan error, 1)
	go func() { served <- srv.ServeTLS(ln, "", "") }()
	fmt.Fprintf(stdout, "ready %s\n", ln.Addr())
	waitStop(ctx, stdin, *lifetime)
	sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		srv.Close()
	}
	if err := <-served; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// okHandler answers every request with a short 200.
func okHandler() http.Handler {
	body := []byte("ok\n")
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		w.Write(body)
	})
}

// parseChain parses a PEM certificate chain, leaf first.
func parseChain(data []byte) (*tls.Certificate, error) {
	var c tls.Certificate
	for rest := data; ; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		if b.Type == "CERTIFICATE" {
			c.Certificate = append(c.Certificate, b.Bytes)
		}
	}
	if len(c.Certificate) == 0 {
		return nil, errors.New("no certificate")
	}
	leaf, err := x509.ParseCertificate(c.Certificate[0])
	if err != nil {
		return nil, err
	}
	c.Leaf = leaf
	return &c, nil
}

// tlsSchemes drops the SHA-1 schemes, as the edge does.
func tlsSchemes(in []tls.SignatureScheme) []tls.SignatureScheme {
	return slices.DeleteFunc(slices.Clone(in), func(s tls.SignatureScheme) bool {
		return s == tls.PKCS1WithSHA1 || s == tls.ECDSAWithSHA1
	})
}

// hsmTLSKey makes an hsm key usable as tls.Certificate.PrivateKey. RSA keys
// that decrypt premaster secrets get a Decrypt method over
// DecryptPremaster, which crypto/tls needs for RSA key exchange (crypto11
// cannot do it, see NOTES); other keys are used as they are.
func hsmTLSKey(k crypto.Signer) crypto.Signer {
	if d, ok := k.(signer.PremasterDecrypter); ok {
		if _, isRSA := k.Public().(*rsa.PublicKey); isRSA {
			return &hsmDecrypter{Signer: k, d: d}
		}
	}
	return k
}

type hsmDecrypter struct {
	crypto.Signer
	d signer.PremasterDecrypter
}

// Decrypt implements crypto.Decrypter for TLS premaster decryption only.
func (k *hsmDecrypter) Decrypt(_ io.Reader, ciphertext []byte, opts crypto.DecrypterOpts) ([]byte, error) {
	o, ok := opts.(*rsa.PKCS1v15DecryptOptions)
	if !ok || o == nil || o.SessionKeyLen != link.PremasterLen {
		return nil, fmt.Errorf("bench: only TLS premaster decryption is supported")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return k.d.DecryptPremaster(ctx, ciphertext)
}

// waitStop returns when ctx is done, stdin reaches EOF, or lifetime
// passes: a server started by the orchestrator stops with it.
func waitStop(ctx context.Context, stdin io.Reader, lifetime time.Duration) {
	eof := make(chan struct{})
	go func() {
		io.Copy(io.Discard, bufio.NewReader(stdin))
		close(eof)
	}()
	t := time.NewTimer(lifetime)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-eof:
	case <-t.C:
	}
}
