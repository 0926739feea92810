package tlscore

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/crypto/ocsp"
)

// OCSPConfig configures OCSP stapling ([CertStoreConfig.OCSP]).
//
// For each certificate whose file also holds its issuer, the store staples
// a response that it has verified: signed by the issuer, or by a responder
// certificate the issuer signed for OCSP signing (and valid now), for this
// certificate's serial number, with status good, a thisUpdate not in the
// future and a nextUpdate not past. Responses come from the OCSP responders
// the certificate names (authority information access), fetched by
// [CertStore.RunOCSP], and from a file beside the certificate named like it
// with the extension .ocsp (www.pem, www.ocsp) holding a DER response,
// read at each Load. The newest verified response wins. A response is
// fetched again when half its validity has passed; while the responders fail,
// the last good response stays stapled until its nextUpdate. A revoked or
// unknown status is logged as an error and nothing is stapled for the
// certificate.
type OCSPConfig struct {
	// HTTPClient fetches responses from responders. Nil means a client with
	// a 10 s timeout that uses the proxy named by HTTP_PROXY and the like.
	HTTPClient *http.Client

	// RetryInterval is the first wait after a failed fetch; it doubles at
	// each failure up to MaxRetryInterval. Zero means 1 minute.
	RetryInterval time.Duration
	// MaxRetryInterval bounds the wait between attempts. Zero means 1 hour.
	MaxRetryInterval time.Duration
}

// Limits on OCSP fetching.
const (
	ocspFetchTimeout     = 10 * time.Second
	ocspMaxResponseBytes = 1 << 20
	// ocspClockSkew is how far in the future a thisUpdate may be.
	ocspClockSkew = 5 * time.Minute
	// ocspMinRefresh is the shortest wait between two fetches of a good
	// response, against a responder that serves responses already past
	// half their validity.
	ocspMinRefresh = time.Minute
)

// ocspStapler keeps the OCSP responses of a CertStore's certificates.
type ocspStapler struct {
	client          *http.Client
	retry, maxRetry time.Duration
	logger          hclog.Logger
	metrics         *Metrics
	wake            chan struct{} // Load → RunOCSP: new slots
	mu              sync.Mutex    // guards slots
	slots           map[[sha256.Size]byte]*ocspSlot
	running         atomic.Bool
	now             func() time.Time
	minRefresh      time.Duration // ocspMinRefresh; shorter in tests
}

// ocspSlot is the OCSP state of one leaf certificate, kept across reloads
// while the leaf is loaded.
type ocspSlot struct {
	file     string // certificate file, for logs
	name     string // metric label
	leaf     *x509.Certificate
	issuer   *x509.Certificate
	staple   atomic.Pointer[ocspStaple]
	next     time.Time // of the next fetch; owned by RunOCSP (and attach, under mu)
	failures int       // consecutive failed fetches; owned by RunOCSP
}

// ocspStaple is a verified good response.
type ocspStaple struct {
	der                    []byte
	thisUpdate, nextUpdate time.Time
}

// current returns the DER response to staple at now, nil if none.
func (sl *ocspSlot) current(now time.Time) []byte {
	if sl == nil {
		return nil
	}
	if st := sl.staple.Load(); st != nil && now.Before(st.nextUpdate) {
		return st.der
	}
	return nil
}

func newOCSPStapler(cfg *OCSPConfig, logger hclog.Logger, metrics *Metrics) *ocspStapler {
	st := &ocspStapler{
		client:   cfg.HTTPClient,
		retry:    cfg.RetryInterval,
		maxRetry: cfg.MaxRetryInterval,
		logger:   logger.Named("ocsp"),
		metrics:  metrics,
		wake:     make(chan struct{}, 1),
		slots:    map[[sha256.Size]byte]*ocspSlot{},
		now:      time.Now,
	}
	st.minRefresh = ocspMinRefresh
	if st.client == nil {
		t := http.DefaultTransport.(*http.Transport).Clone()
		st.client = &http.Client{Timeout: ocspFetchTimeout, Transport: t}
	}
	if st.retry <= 0 {
		st.retry = time.Minute
	}
	if st.maxRetry <= 0 {
		st.maxRetry = time.Hour
	}
	metrics.setOCSPSource(st.ages)
	return st
}

// Validate reports whether the configuration is usable.
func (c *OCSPConfig) Validate() error {
	if c.RetryInterval < 0 || c.MaxRetryInterval < 0 {
		return errors.New("tlscore: OCSPConfig retry intervals must not be negative")
	}
	return nil
}

// attach gives each entry of set that can have OCSP responses (its file
// holds its issuer) its slot, keeping the slots, and so the responses, of
// leaves loaded before, and reads the entries' .ocsp files. It is called by
// Load before set is served.
func (st *ocspStapler) attach(set *certSet) {
	st.mu.Lock()
	defer st.mu.Unlock()
	slots := make(map[[sha256.Size]byte]*ocspSlot, len(set.all))
	now := st.now()
	for _, e := range set.all {
		file := ocspFileFor(e.file)
		_, statErr := os.Stat(file)
		hasFile := statErr == nil
		if len(e.cert.Leaf.OCSPServer) == 0 && !hasFile {
			continue
		}
		if len(e.cert.Certificate) < 2 {
			st.logger.Warn("OCSP stapling off for this certificate: its file does not hold its issuer, so responses cannot be verified; append the issuer certificate",
				"file", e.file)
			continue
		}
		sl := st.slots[e.leafHash]
		if sl == nil {
			if sl = slots[e.leafHash]; sl == nil {
				issuer, err := x509.ParseCertificate(e.cert.Certificate[1])
				if err != nil { // readChainFile parsed it already
					continue
				}
				sl = &ocspSlot{file: e.file, name: certLabel(e), leaf: e.cert.Leaf, issuer: issuer}
			}
		}
		slots[e.leafHash] = sl
		e.ocsp = sl
		if hasFile {
			st.readFile(sl, file, now)
		} else if statErr != nil && !errors.Is(statErr, fs.ErrNotExist) {
			st.logger.Error("OCSP response file unreadable", "file", file, "error", statErr)
		}
	}
	st.slots = slots
	select {
	case st.wake <- struct{}{}:
	default:
	}
}

// ocspFileFor returns the .ocsp file beside a certificate file.
func ocspFileFor(certFile string) string {
	return strings.TrimSuffix(certFile, filepath.Ext(certFile)) + ".ocsp"
}

// readFile installs the response in file, if it verifies.
func (st *ocspStapler) readFile(sl *ocspSlot, file string, now time.Time) {
	der, err := os.ReadFile(file)
	if err == nil && len(der) > ocspMaxResponseBytes {
		err = fmt.Errorf("larger than %d bytes", ocspMaxResponseBytes)
	}
	if err != nil {
		st.metrics.observeOCSP(ocspResultError)
		st.logger.Error("OCSP response file unreadable", "file", file, "error", err)
		return
	}
	st.install(sl, der, "file "+file, now)
}

// install verifies der and, if it is a good response newer than the one
// stapled, staples it. A revoked or unknown status removes the staple. It
// returns the verified response, or nil and the error, which it has logged.
func (st *ocspStapler) install(sl *ocspSlot, der []byte, source string, now time.Time) (*ocsp.Response, error) {
	resp, err := verifyOCSP(der, sl.leaf, sl.issuer, now)
	if err != nil {
		st.metrics.observeOCSP(ocspResultError)
		st.logger.Error("OCSP response rejected", "file", sl.file, "source", source, "error", err)
		return nil, err
	}
	switch resp.Status {
	case ocsp.Good:
	case ocsp.Revoked:
		st.metrics.observeOCSP(ocspResultRevoked)
		sl.staple.Store(nil)
		st.logger.Error("CERTIFICATE REVOKED: its OCSP response says revoked; no response is stapled, and clients that check revocation refuse it: replace the certificate",
			"file", sl.file, "name", sl.name, "serial", sl.leaf.SerialNumber.String(), "revoked_at", resp.RevokedAt,
			"reason", resp.RevocationReason, "source", source)
		return resp, fmt.Errorf("certificate revoked at %v", resp.RevokedAt)
	default:
		st.metrics.observeOCSP(ocspResultUnknown)
		sl.staple.Store(nil)
		st.logger.Error("OCSP responder does not know this certificate (status unknown); no response is stapled",
			"file", sl.file, "name", sl.name, "serial", sl.leaf.SerialNumber.String(), "source", source)
		return resp, errors.New("certificate status unknown")
	}
	st.metrics.observeOCSP(ocspResultGood)
	if cur := sl.staple.Load(); cur != nil && !resp.ThisUpdate.After(cur.thisUpdate) && now.Before(cur.nextUpdate) {
		return resp, nil // what is stapled is as new
	}
	sl.staple.Store(&ocspStaple{der: der, thisUpdate: resp.ThisUpdate, nextUpdate: resp.NextUpdate})
	st.logger.Info("OCSP response stapled", "file", sl.file, "name", sl.name, "source", source,
		"this_update", resp.ThisUpdate, "next_update", resp.NextUpdate)
	return resp, nil
}

// verifyOCSP parses der as the OCSP response for leaf and checks everything
// but its status: its signature is the issuer's, or that of a responder
// certificate the issuer signed for OCSP signing and valid at now; it is
// for leaf's serial number; its thisUpdate is not in the future; its
// nextUpdate is set and after now.
func verifyOCSP(der []byte, leaf, issuer *x509.Certificate, now time.Time) (*ocsp.Response, error) {
	// ParseResponseForCert checks the signature: by issuer, or by the
	// certificate embedded in the response, which it checks issuer signed.
	resp, err := ocsp.ParseResponseForCert(der, leaf, issuer)
	if err != nil {
		return nil, fmt.Errorf("invalid OCSP response: %w", err)
	}
	if rc := resp.Certificate; rc != nil && !bytes.Equal(rc.Raw, issuer.Raw) {
		if !hasOCSPSigning(rc) {
			return nil, fmt.Errorf("OCSP response signed by %q, which the issuer did not authorise for OCSP signing (no OCSPSigning extended key usage)", rc.Subject)
		}
		if now.Before(rc.NotBefore) || now.After(rc.NotAfter) {
			return nil, fmt.Errorf("OCSP responder certificate %q is not valid now (valid %v to %v)", rc.Subject, rc.NotBefore, rc.NotAfter)
		}
	}
	switch {
	case resp.ThisUpdate.After(now.Add(ocspClockSkew)):
		return nil, fmt.Errorf("OCSP response thisUpdate %v is in the future", resp.ThisUpdate)
	case resp.NextUpdate.IsZero():
		return nil, errors.New("OCSP response has no nextUpdate, so its validity is unknown")
	case !now.Before(resp.NextUpdate):
		return nil, fmt.Errorf("OCSP response expired: nextUpdate %v", resp.NextUpdate)
	}
	return resp, nil
}

func hasOCSPSigning(c *x509.Certificate) bool {
	for _, u := range c.ExtKeyUsage {
		if u == x509.ExtKeyUsageOCSPSigning {
			return true
		}
	}
	return false
}

// RunOCSP fetches the OCSP responses of the store's certificates from their
// responders and refreshes them, until ctx ends. Without
// [CertStoreConfig.OCSP] it returns at once. Call it once, after the first
// Load; a later Load wakes it for new certificates.
func (s *CertStore) RunOCSP(ctx context.Context) {
	st := s.ocsp
	if st == nil || !st.running.CompareAndSwap(false, true) {
		return
	}
	defer st.running.Store(false)
	for {
		now := st.now()
		wait := st.maxRetry
		for _, sl := range st.snapshot() {
			st.expire(sl, now)
			if len(sl.leaf.OCSPServer) == 0 {
				continue
			}
			st.mu.Lock()
			next := sl.next
			st.mu.Unlock()
			if !now.Before(next) {
				next = st.refresh(ctx, sl)
				if ctx.Err() != nil {
					return
				}
				st.mu.Lock()
				sl.next = next
				st.mu.Unlock()
			}
			wait = min(wait, next.Sub(now))
		}
		// Wake when a stapled response expires, to log it.
		for _, sl := range st.snapshot() {
			if cur := sl.staple.Load(); cur != nil && now.Before(cur.nextUpdate) {
				wait = min(wait, cur.nextUpdate.Sub(now)+time.Second)
			}
		}
		t := time.NewTimer(max(wait, 10*time.Millisecond))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-st.wake:
			t.Stop()
		case <-t.C:
		}
	}
}

func (st *ocspStapler) snapshot() []*ocspSlot {
	st.mu.Lock()
	defer st.mu.Unlock()
	out := make([]*ocspSlot, 0, len(st.slots))
	for _, sl := range st.slots {
		out = append(out, sl)
	}
	return out
}

// expire logs, once, that the response stapled for sl has expired and is
// no longer stapled.
func (st *ocspStapler) expire(sl *ocspSlot, now time.Time) {
	cur := sl.staple.Load()
	if cur == nil || now.Before(cur.nextUpdate) {
		return
	}
	if sl.staple.CompareAndSwap(cur, nil) {
		st.logger.Error("OCSP response expired and no newer one could be fetched: nothing is stapled for this certificate",
			"file", sl.file, "name", sl.name, "next_update", cur.nextUpdate, "responders", strings.Join(sl.leaf.OCSPServer, ","))
	}
}

// refresh fetches sl's response from its responders, in order, until one
// gives a response that verifies, and returns when to fetch again.
func (st *ocspStapler) refresh(ctx context.Context, sl *ocspSlot) time.Time {
	req, err := ocsp.CreateRequest(sl.leaf, sl.issuer, nil)
	if err != nil {
		st.logger.Error("cannot build an OCSP request", "file", sl.file, "error", err)
		return st.retryAt(sl)
	}
	var errs []error
	for _, url := range sl.leaf.OCSPServer {
		der, err := st.fetch(ctx, url, req)
		if err != nil {
			if ctx.Err() != nil {
				return time.Time{}
			}
			st.metrics.observeOCSP(ocspResultError)
			errs = append(errs, fmt.Errorf("%s: %w", url, err))
			continue
		}
		resp, err := st.install(sl, der, url, st.now())
		if resp == nil {
			errs = append(errs, fmt.Errorf("%s: %w", url, err))
			continue
		}
		if resp.Status != ocsp.Good {
			return st.retryAt(sl)
		}
		sl.failures = 0
		half := resp.ThisUpdate.Add(resp.NextUpdate.Sub(resp.ThisUpdate) / 2)
		return maxTime(half, st.now().Add(st.minRefresh))
	}
	next := st.retryAt(sl)
	args := []any{"file", sl.file, "name", sl.name, "error", errors.Join(errs...), "next_attempt", next}
	if cur := sl.staple.Load(); cur != nil {
		st.logger.Warn("OCSP fetch failed; the last good response stays stapled until its nextUpdate",
			append(args, "next_update", cur.nextUpdate)...)
	} else {
		st.logger.Warn("OCSP fetch failed; nothing is stapled for this certificate", args...)
	}
	return next
}

// retryAt counts a failure of sl and returns when to try again.
func (st *ocspStapler) retryAt(sl *ocspSlot) time.Time {
	wait := st.retry
	for i := 0; i < sl.failures && wait < st.maxRetry; i++ {
		wait *= 2
	}
	sl.failures++
	return st.now().Add(min(wait, st.maxRetry))
}

// fetch POSTs an OCSP request to a responder and returns its answer.
func (st *ocspStapler) fetch(ctx context.Context, url string, req []byte) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, ocspFetchTimeout)
	defer cancel()
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(req))
	if err != nil {
		return nil, err
	}
	hreq.Header.Set("Content-Type", "application/ocsp-request")
	hreq.Header.Set("Accept", "application/ocsp-response")
	res, err := st.client.Do(hreq)
	if err != nil {
		return nil, err
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("HTTP status %s", res.Status)
	}
	der, err := io.ReadAll(io.LimitReader(res.Body, ocspMaxResponseBytes+1))
	if err != nil {
		return nil, err
	}
	if len(der) > ocspMaxResponseBytes {
		return nil, fmt.Errorf("response larger than %d bytes", ocspMaxResponseBytes)
	}
	return der, nil
}

// ages returns, by metric label, the thisUpdate of the responses stapled
// now (the oldest if several certificates share a label).
func (st *ocspStapler) ages() map[string]time.Time {
	now := st.now()
	out := map[string]time.Time{}
	for _, sl := range st.snapshot() {
		if cur := sl.staple.Load(); cur != nil && now.Before(cur.nextUpdate) {
			if t, ok := out[sl.name]; !ok || cur.thisUpdate.Before(t) {
				out[sl.name] = cur.thisUpdate
			}
		}
	}
	return out
}

// certLabel names a certificate in metrics: its first DNS name, else its
// file name.
func certLabel(e *certEntry) string {
	if len(e.cert.Leaf.DNSNames) > 0 {
		return e.cert.Leaf.DNSNames[0]
	}
	return filepath.Base(e.file)
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}
