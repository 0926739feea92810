package tlscore

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/hashicorp/go-hclog"

	"github.com/keyless-tls/keyless/internal/hostname"
	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// CertStoreConfig configures a [CertStore]. It must not be modified after it
// is passed to [NewCertStore].
type CertStoreConfig struct {
	// Client lists the keyserver's keys and performs their operations.
	// Required.
	Client *Client

	// Default names the certificate served when the client sends no server
	// name, or one that no certificate covers: either the base name of a
	// file in the directory ("default.pem") or a host name that a
	// certificate covers ("www.example.com"). A file name takes precedence.
	// Empty means no default: such handshakes fail.
	Default string

	// RequireAll makes Load fail, keeping the previous certificates, when
	// any certificate file cannot be served: its file cannot be read or
	// parsed, its chain is out of order, or the keyserver holds no key for
	// it (a *MissingKeysError). By default Load skips each such file with an
	// error in the log naming it, counts it in
	// keyless_edge_certificates_not_served, and serves the rest, so that one
	// bad file does not block a start or a reload for every other name.
	RequireAll bool

	// Logger receives errors about certificates skipped, warnings about
	// certificates (expired, not yet valid, unusable in TLS 1.3) and one
	// line per Load. Nil means no logging.
	Logger hclog.Logger

	// Metrics, if set, is told the certificates of each successful Load
	// (keyless_edge_certificates_loaded,
	// keyless_edge_certificates_not_served and
	// keyless_edge_certificate_expiry_timestamp_seconds).
	Metrics *Metrics

	// OCSP turns on OCSP stapling (see [OCSPConfig] and
	// [CertStore.RunOCSP]). Nil means no stapling.
	OCSP *OCSPConfig
}

// Validate reports whether the configuration is usable.
func (c *CertStoreConfig) Validate() error {
	if c.Client == nil {
		return errors.New("tlscore: CertStoreConfig.Client is nil")
	}
	if c.OCSP != nil {
		return c.OCSP.Validate()
	}
	return nil
}

// CertStore selects, for each TLS handshake, a certificate chain whose
// private key is a [RemoteKey]. It serves as tls.Config.GetCertificate.
//
// The certificates come from [CertStore.Load], which replaces the whole set
// atomically; until the first successful Load, every handshake fails. A
// CertStore is safe for concurrent use.
type CertStore struct {
	client      *Client
	defaultName string
	requireAll  bool
	logger      hclog.Logger
	metrics     *Metrics
	ocsp        *ocspStapler // nil: no stapling

	loadMu sync.Mutex // serializes Load
	set    atomic.Pointer[certSet]

	connPrefix string // random per CertStore, so connection ids differ across restarts
	connSeq    atomic.Uint64
}

// NewCertStore returns an empty CertStore; call Load before serving.
func NewCertStore(cfg CertStoreConfig) (*CertStore, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	logger := cfg.Logger
	if logger == nil {
		logger = hclog.NewNullLogger()
	}
	var p [4]byte
	_, _ = rand.Read(p[:]) // crypto/rand.Read never fails
	s := &CertStore{
		client:      cfg.Client,
		defaultName: cfg.Default,
		requireAll:  cfg.RequireAll,
		logger:      logger.Named("certstore"),
		metrics:     cfg.Metrics,
		connPrefix:  hex.EncodeToString(p[:]),
	}
	if cfg.OCSP != nil {
		s.ocsp = newOCSPStapler(cfg.OCSP, logger, cfg.Metrics)
	}
	return s, nil
}

// MissingKeysError reports certificates whose private key the keyserver
// does not hold (or does not let this edge use). [CertStore.Load] returns
// it wrapped in an error that names the package and the directory.
type MissingKeysError struct {
	// Files are the certificate files, in the order they were read.
	Files []string
	// KeyIDs are the key ids of the files' leaf certificates, in the same
	// order.
	KeyIDs []link.KeyID
}

// Error lists the files and their key ids.
func (e *MissingKeysError) Error() string {
	var b strings.Builder
	b.WriteString("the keyserver holds no key for ")
	for i, f := range e.Files {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "%s (key id %s)", f, link.FormatKeyID(e.KeyIDs[i]))
	}
	return b.String()
}

// certEntry is one loaded certificate. It is immutable.
type certEntry struct {
	file     string
	names    []string        // normalized DNS SANs, wildcards included
	cert     tls.Certificate // PrivateKey is the unbound RemoteKey
	key      RemoteKey
	leafHash [sha256.Size]byte // of the leaf's DER, for session tickets
	ocsp     *ocspSlot         // nil: no OCSP stapling; set by Load before the entry is served
}

// certSet is one generation of certificates. It is immutable.
type certSet struct {
	exact    map[string][]*certEntry // by normalized name
	wildcard map[string][]*certEntry // "*.example.com" under "example.com"
	def      *certEntry              // nil if there is no default
	all      []*certEntry            // every certificate, in file-name order
}

// Load reads the certificate chains in dir and replaces the store's
// certificates with those it can serve.
//
// Every regular file named *.pem or *.crt (case-insensitively; names starting
// with a dot are ignored) must hold a leaf certificate and then its issuers in
// order, as PEM CERTIFICATE blocks; other block types are skipped, but a file
// with any PRIVATE KEY block is refused, and so is any *.key file: an edge
// must not hold private keys.
// Each leaf's key is matched by key id with the keyserver's ListKeys answer.
// A leaf is served for its DNS subject alternative names ("*.example.com"
// stands for exactly one label); several certificates may cover one name (an
// ECDSA and an RSA one, say), and the first in file-name order that the
// client supports is chosen, one valid now before any other.
//
// A certificate file that cannot be read or parsed, whose chain is out of
// order, or whose key the keyserver does not hold is skipped, with an error
// logged that names it, unless RequireAll is set; if the default
// certificate is among them, handshakes that would have used it fail until
// it is fixed.
//
// Load fails, keeping the previous certificates, if the keyserver cannot be
// asked, if the directory cannot be read, if a file holds a private key, if
// the default certificate names no file and no name, if no certificate is
// left to serve, or, with RequireAll, if any file was skipped (missing keys
// are then reported as a *MissingKeysError). All problems are reported at
// once. Expired and not yet valid certificates are loaded with a warning.
// Concurrent calls are serialized.
func (s *CertStore) Load(ctx context.Context, dir string) error {
	s.loadMu.Lock()
	defer s.loadMu.Unlock()
	set, skipped, err := s.load(ctx, dir)
	if err != nil {
		return fmt.Errorf("tlscore: load certificates from %s: %w", dir, err)
	}
	if s.ocsp != nil {
		s.ocsp.attach(set)
	}
	s.set.Store(set)
	s.metrics.setCertificates(set.all)
	s.metrics.setNotServed(skipped)
	return nil
}

// Reasons a certificate file is not served, the values of the reason label
// of keyless_edge_certificates_not_served.
const (
	notServedMissingKey = "missing_key" // the keyserver holds no key for it
	notServedInvalid    = "invalid"     // unreadable, unparsable or out of order
)

// skippedCert is a certificate file that Load did not serve.
type skippedCert struct {
	file   string
	reason string // notServedMissingKey or notServedInvalid
	err    error
}

func (s *CertStore) load(ctx context.Context, dir string) (*certSet, []skippedCert, error) {
	files, err := certFiles(dir)
	if err != nil {
		return nil, nil, err
	}
	infos, err := s.client.listKeys(ctx)
	if err != nil {
		return nil, nil, err
	}
	keys := make(map[link.KeyID]*keylessv1.Key, len(infos))
	for _, info := range infos {
		if id, ok := keyIDFromBytes(info.GetKeyId()); ok {
			keys[id] = info
		}
	}

	var (
		errs    []error // fatal whatever RequireAll says
		skipped []skippedCert
		missing MissingKeysError
		entries []*certEntry
		now     = time.Now()
	)
	skip := func(file, reason string, err error) {
		skipped = append(skipped, skippedCert{file: file, reason: reason, err: err})
	}
	for _, f := range files {
		chain, err := readChainFile(f)
		if err != nil {
			if errors.Is(err, errPrivateKeyInFile) {
				errs = append(errs, err)
			} else {
				skip(f, notServedInvalid, err)
			}
			continue
		}
		id, err := link.KeyIDOf(chain[0].PublicKey)
		if err != nil {
			skip(f, notServedInvalid, fmt.Errorf("%s: %w", f, err))
			continue
		}
		info, ok := keys[id]
		if !ok {
			missing.Files = append(missing.Files, f)
			missing.KeyIDs = append(missing.KeyIDs, id)
			skip(f, notServedMissingKey, fmt.Errorf("%s: the keyserver holds no key for it (key id %s)", f, link.FormatKeyID(id)))
			continue
		}
		e, err := s.newEntry(f, chain, info)
		if err != nil {
			skip(f, notServedInvalid, err)
			continue
		}
		s.checkValidity(e, now)
		entries = append(entries, e)
	}
	if s.requireAll {
		for _, sk := range skipped {
			if sk.reason != notServedMissingKey {
				errs = append(errs, sk.err)
			}
		}
		if len(missing.Files) > 0 {
			errs = append(errs, &missing)
		}
	}
	if len(errs) > 0 {
		return nil, nil, errors.Join(errs...)
	}
	if len(entries) == 0 {
		if len(skipped) > 0 {
			errs := []error{errors.New("no certificate to serve: every certificate file was skipped")}
			for _, sk := range skipped {
				errs = append(errs, sk.err)
			}
			return nil, nil, errors.Join(errs...)
		}
		return nil, nil, errors.New("no certificate to serve (certificate files are *.pem or *.crt)")
	}

	set := &certSet{exact: make(map[string][]*certEntry), wildcard: make(map[string][]*certEntry), all: entries}
	for _, e := range entries {
		for _, n := range e.names {
			if parent, ok := strings.CutPrefix(n, "*."); ok {
				set.wildcard[parent] = append(set.wildcard[parent], e)
			} else {
				set.exact[n] = append(set.exact[n], e)
			}
		}
	}
	if s.defaultName != "" {
		set.def = set.findDefault(entries, s.defaultName)
		if set.def == nil && !s.defaultSkipped(skipped) {
			return nil, nil, fmt.Errorf("default certificate %q: no certificate file has that name and no certificate covers it", s.defaultName)
		}
	}
	for _, sk := range skipped {
		s.logger.Error("certificate not served: fix or remove the file, then reload", "file", sk.file, "reason", sk.reason, "error", sk.err)
	}
	if s.defaultName != "" && set.def == nil {
		s.logger.Error("the default certificate is not served: handshakes without a known server name fail", "default_cert", s.defaultName)
	}
	s.logger.Info("certificates loaded", "dir", dir, "certificates", len(entries),
		"names", len(set.exact)+len(set.wildcard), "skipped", len(skipped))
	return set, skipped, nil
}

// defaultSkipped reports whether the default certificate may be among the
// skipped files: one has its base name, or one could not be read far
// enough to know which names it covers, or covers it.
func (s *CertStore) defaultSkipped(skipped []skippedCert) bool {
	for _, sk := range skipped {
		if filepath.Base(sk.file) == s.defaultName || sk.reason == notServedInvalid {
			return true
		}
		if sk.reason == notServedMissingKey {
			if chain, err := readChainFile(sk.file); err == nil && chain[0].VerifyHostname(s.defaultName) == nil {
				return true
			}
		}
	}
	return false
}

// certFiles lists the certificate files in dir, sorted by name.
func certFiles(dir string) ([]string, error) {
	des, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("certificate directory: %w", err)
	}
	var files []string
	for _, de := range des {
		name := de.Name()
		ext := strings.ToLower(filepath.Ext(name))
		if ext == ".key" && !strings.HasPrefix(name, ".") {
			return nil, fmt.Errorf("%s: a private key file in the certificate directory; an edge must not hold private keys: remove it", filepath.Join(dir, name))
		}
		if strings.HasPrefix(name, ".") || (ext != ".pem" && ext != ".crt") {
			continue
		}
		path := filepath.Join(dir, name)
		// Stat, not de.Type: a symbolic link to a file counts (as in a
		// Kubernetes secret volume).
		if fi, err := os.Stat(path); err != nil {
			return nil, fmt.Errorf("certificate file: %w", err)
		} else if !fi.Mode().IsRegular() {
			continue
		}
		files = append(files, path)
	}
	return files, nil
}

// errPrivateKeyInFile is wrapped by the error of readChainFile for a file
// that holds a private key. Load refuses such a directory whatever
// RequireAll says: the key must be removed from the edge, not skipped.
var errPrivateKeyInFile = errors.New("an edge must not hold private keys")

// readChainFile reads a PEM file holding a leaf certificate and then its
// issuers, and checks that each certificate was issued by the next.
func readChainFile(path string) ([]*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("certificate file: %w", err)
	}
	var (
		chain    []*x509.Certificate
		parseErr error
	)
	for rest := data; ; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		switch {
		case link.IsPrivateKeyBlock(b):
			return nil, fmt.Errorf("%s holds a private key (PEM block %q): %w; remove the key from the file and keep it only on the keyserver", path, b.Type, errPrivateKeyInFile)
		case b.Type == "CERTIFICATE":
			c, err := x509.ParseCertificate(b.Bytes)
			if err != nil && parseErr == nil {
				parseErr = fmt.Errorf("%s: certificate %d: %w", path, len(chain)+1, err)
			}
			chain = append(chain, c)
		}
	}
	switch {
	case parseErr != nil:
		return nil, parseErr
	case len(chain) == 0:
		return nil, fmt.Errorf("%s: no CERTIFICATE PEM block", path)
	}
	for i := 0; i+1 < len(chain); i++ {
		if err := chain[i].CheckSignatureFrom(chain[i+1]); err != nil {
			return nil, fmt.Errorf("%s: certificate %d was not issued by certificate %d; the file must hold the leaf first, then each issuer in order: %w", path, i+1, i+2, err)
		}
	}
	return chain, nil
}

func (s *CertStore) newEntry(file string, chain []*x509.Certificate, info *keylessv1.Key) (*certEntry, error) {
	leaf := chain[0]
	key, err := newRemoteKey(s.client, info)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	schemes, tls13, err := certificateSchemes(leaf.PublicKey, info.GetSignatureAlgorithms())
	if err != nil {
		return nil, fmt.Errorf("%s: key %s: %w", file, link.FormatKeyID(key.KeyID()), err)
	}
	if !tls13 {
		s.logger.Warn("no TLS 1.3 signature scheme for this certificate's key: TLS 1.3 clients cannot use it",
			"file", file, "key_id", link.FormatKeyID(key.KeyID()), "schemes", fmt.Sprint(schemes))
	}
	e := &certEntry{
		file:     file,
		key:      key,
		leafHash: sha256.Sum256(leaf.Raw),
		cert: tls.Certificate{
			PrivateKey:                   key,
			Leaf:                         leaf,
			SupportedSignatureAlgorithms: schemes,
		},
	}
	for _, c := range chain {
		e.cert.Certificate = append(e.cert.Certificate, c.Raw)
	}
	for _, n := range leaf.DNSNames {
		if n = hostname.Normalize(n); n != "" && !slices.Contains(e.names, n) {
			e.names = append(e.names, n)
		}
	}
	if len(e.names) == 0 {
		s.logger.Warn("certificate has no DNS names: it can only be the default certificate", "file", file)
	}
	s.logger.Debug("certificate loaded", "file", file, "names", strings.Join(e.names, ","),
		"key_id", link.FormatKeyID(key.KeyID()), "not_after", leaf.NotAfter)
	return e, nil
}

// checkValidity warns about a certificate that clients will reject for its
// dates. Such a certificate is still loaded: refusing it would turn a
// warning into an outage for every other name.
func (s *CertStore) checkValidity(e *certEntry, now time.Time) {
	leaf := e.cert.Leaf
	switch {
	case now.After(leaf.NotAfter):
		s.logger.Warn("certificate has expired", "file", e.file, "not_after", leaf.NotAfter)
	case now.Before(leaf.NotBefore):
		s.logger.Warn("certificate is not yet valid", "file", e.file, "not_before", leaf.NotBefore)
	}
}

// findDefault finds the default certificate by file base name, then by a
// host name a certificate covers.
func (cs *certSet) findDefault(entries []*certEntry, name string) *certEntry {
	for _, e := range entries {
		if filepath.Base(e.file) == name {
			return e
		}
	}
	if c := cs.candidates(hostname.Normalize(name)); len(c) > 0 {
		return c[0]
	}
	return nil
}

// candidates returns the certificates that cover a normalized name: those
// naming it exactly, then the wildcard ones.
func (cs *certSet) candidates(name string) []*certEntry {
	if name == "" {
		return nil
	}
	exact := cs.exact[name]
	parent, ok := hostname.Parent(name)
	if !ok || len(cs.wildcard[parent]) == 0 {
		return exact
	}
	return append(slices.Clip(exact), cs.wildcard[parent]...)
}

// serving returns the certificates that may serve a handshake for
// serverName: its candidates, else the default.
func (cs *certSet) serving(serverName string) []*certEntry {
	if cands := cs.candidates(hostname.Normalize(serverName)); len(cands) > 0 {
		return cands
	}
	if cs.def != nil {
		return []*certEntry{cs.def}
	}
	return nil
}

// pick chooses the certificate for a handshake: the first candidate the
// client supports that is valid now (a renewed certificate added beside
// the expired one it renews, say), else the first the client supports, else
// the first candidate (the handshake then fails with crypto/tls's precise
// error), else the default.
func (cs *certSet) pick(hello *tls.ClientHelloInfo) *certEntry {
	cands := cs.candidates(hostname.Normalize(hello.ServerName))
	if len(cands) > 1 {
		now := time.Now()
		var supported *certEntry
		for _, e := range cands {
			if hello.SupportsCertificate(&e.cert) != nil {
				continue
			}
			if leaf := e.cert.Leaf; !now.Before(leaf.NotBefore) && !now.After(leaf.NotAfter) {
				return e
			}
			if supported == nil {
				supported = e
			}
		}
		if supported != nil {
			return supported
		}
	}
	if len(cands) > 0 {
		return cands[0]
	}
	return cs.def
}

// holds reports whether a certificate of the store covers serverName (the
// default certificate aside).
func (s *CertStore) holds(serverName string) bool {
	set := s.set.Load()
	return set != nil && len(set.candidates(hostname.Normalize(serverName))) > 0
}

// servingLeaves returns the SHA-256 digests of the leaf certificates that
// may serve a handshake for serverName now.
func (s *CertStore) servingLeaves(serverName string) [][sha256.Size]byte {
	set := s.set.Load()
	if set == nil {
		return nil
	}
	var out [][sha256.Size]byte
	for _, e := range set.serving(serverName) {
		out = append(out, e.leafHash)
	}
	return out
}

// GetCertificate returns the certificate for a handshake, for use as
// tls.Config.GetCertificate: by server name (exact names before wildcards,
// case-insensitive, a trailing dot ignored), else the default certificate.
// A server name that is not a host name (see hostname.CheckServerName), such as an
// IP address some clients send, is treated as none. It fails if nothing has
// been loaded, and with an *UnrecognizedNameError if no certificate
// applies.
//
// The result is a shallow copy whose PrivateKey is bound to
// hello.Context(), so that the key operations end with the handshake, and
// carries a RequestContext (server name, client address, a connection id
// unique on this edge) for the keyserver's audit trail.
func (s *CertStore) GetCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	set := s.set.Load()
	if set == nil {
		return nil, errors.New("tlscore: no certificates loaded")
	}
	serverName := hello.ServerName
	if err := hostname.CheckServerName(serverName); err != nil {
		// As if the client had sent none (some send an IP address).
		s.logger.Debug("server name ignored", "error", err)
		h := *hello
		h.ServerName = ""
		hello, serverName = &h, ""
	}
	e := set.pick(hello)
	if e == nil {
		return nil, &UnrecognizedNameError{ServerName: hello.ServerName}
	}
	// serverName is a host name or empty; Client cuts any field the
	// keyserver would refuse (see auditContext).
	rc := &keylessv1.RequestContext{
		ServerName:   serverName,
		ConnectionId: s.connPrefix + "-" + strconv.FormatUint(s.connSeq.Add(1), 10),
	}
	if hello.Conn != nil {
		rc.ClientAddress = hello.Conn.RemoteAddr().String()
	}
	c := e.cert
	c.PrivateKey = e.key.WithContext(keyOpContext(hello), rc)
	c.OCSPStaple = e.ocsp.current(time.Now())
	return &c, nil
}

// UnrecognizedNameError is the error of [CertStore.GetCertificate] when no
// certificate covers the server name and there is no default certificate.
// The TLS configuration of [NewServerTLSConfig] answers such a handshake
// with the unrecognized_name alert (RFC 6066), as the client should be
// told, rather than internal_error.
type UnrecognizedNameError struct {
	ServerName string // as the client sent it; empty if it sent none
}

func (e *UnrecognizedNameError) Error() string {
	if e.ServerName == "" {
		return "tlscore: the client sent no server name and there is no default certificate"
	}
	return fmt.Sprintf("tlscore: no certificate for server name %q and no default certificate", e.ServerName)
}

// auditContext returns rc, or, if one of its fields would make the
// keyserver refuse the request for its audit fields or protobuf refuse to
// encode it (and with it every operation of its stream's message), a copy
// with every field passed through link.ContextField.
func auditContext(rc *keylessv1.RequestContext) *keylessv1.RequestContext {
	fits := func(s string) bool { return len(s) <= link.MaxContextFieldLen && utf8.ValidString(s) }
	if rc == nil || fits(rc.GetServerName()) && fits(rc.GetClientAddress()) && fits(rc.GetConnectionId()) {
		return rc
	}
	return &keylessv1.RequestContext{
		ServerName:    link.ContextField(rc.GetServerName()),
		ClientAddress: link.ContextField(rc.GetClientAddress()),
		ConnectionId:  link.ContextField(rc.GetConnectionId()),
	}
}

func keyIDFromBytes(b []byte) (link.KeyID, bool) {
	var id link.KeyID
	if len(b) != len(id) {
		return id, false
	}
	copy(id[:], b)
	return id, true
}

// Loaded returns how many certificates the store serves: zero until a Load
// has succeeded.
func (s *CertStore) Loaded() int {
	if set := s.set.Load(); set != nil {
		return len(set.all)
	}
	return 0
}
