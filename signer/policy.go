package signer

import (
	"crypto"
	"crypto/x509"
	"fmt"
	"net/url"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/keyless-tls/keyless/internal/hostname"
	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// Operations a policy rule can allow.
const (
	// OpSign is a Sign request: a TLS handshake signature.
	OpSign = "sign"
	// OpDecrypt is a Decrypt request: a TLS 1.2 RSA premaster decryption.
	OpDecrypt = "decrypt"
)

// Policy decides who may use the keyserver: which client identities are
// admitted at all (the allow-list: every identity a rule names, less those
// of the deny list), and, for each of them, which keys, operations and
// signature schemes it may use. Anything a rule does not allow is denied.
//
// A Policy is parsed from YAML by [ParsePolicy]; the format is described
// in the README's security section and in docs/SECURITY.md. It is immutable
// and safe for concurrent use.
type Policy struct {
	source string
	rules  []*policyRule
	quotas []*policyQuota
	groups map[string][]string
	// unusedGroups are groups no rule or quota refers to, sorted.
	unusedGroups []string
	// listed holds every identity that some rule names, in normalized form.
	listed map[string]bool
	// deny holds the identities of the deny list, normalized; denyAll is
	// set by its "*", and denyLine is its line, for messages.
	deny     map[string]bool
	denyAll  bool
	denyLine int
	// identityGroups holds IdentityGroup's answer for each listed
	// identity, computed once because the metrics ask at every request.
	identityGroups map[string]string
	// certs maps key ids to the normalized DNS names of their certificates,
	// for cert: patterns; see [Policy.WithCertificates].
	certs map[link.KeyID][]string
	// certFiles are the files certs came from, for Lint; see
	// [Policy.WithCertificateFiles].
	certFiles []CertificateFile
}

// CertificateFile is a certificate file given to the keyserver for the
// policy's cert: patterns (keyserver serve -certs DIR).
type CertificateFile struct {
	// Path names the file in warnings.
	Path string
	// Leaf is the file's certificate; nil when it could not be used.
	Leaf *x509.Certificate
	// Err says why the file could not be used, when Leaf is nil.
	Err error
}

type policyRule struct {
	name       string
	line       int
	identities map[string]bool
	keys       []keyPattern
	sign       bool
	decrypt    bool
	// tickets allows GetTicketKeys; the rule's name is the ticket group.
	tickets bool
	schemes map[keylessv1.SignatureAlgorithm]bool
}

type policyQuota struct {
	name       string
	desc       string // how refusals name it: quota "x" of the policy
	line       int
	identities map[string]bool
	quota      Quota
}

// keyPattern is one entry of a rule's keys.
type keyPattern struct {
	text  string // as written, for messages
	kind  keyPatternKind
	id    link.KeyID // for keyByID
	value string     // the label, or the normalized certificate name pattern
}

// keyPatternKind says what a key pattern matches keys by. The zero value
// is no kind: parseKeyPattern never returns it.
type keyPatternKind int

const (
	keyAny     keyPatternKind = iota + 1 // "*": every key
	keyByID                              // id:<key id>
	keyByLabel                           // label:<CKA_LABEL>
	keyByCert                            // cert:<certificate name pattern>
)

// String returns the kind as a policy writes it: "*", or the prefix before
// the colon ("id", "label", "cert").
func (k keyPatternKind) String() string {
	switch k {
	case keyAny:
		return "*"
	case keyByID:
		return "id"
	case keyByLabel:
		return "label"
	case keyByCert:
		return "cert"
	}
	return fmt.Sprintf("keyPatternKind(%d)", int(k))
}

// SchemeName returns the name a policy and the audit trail use for a
// signature algorithm: the proto enum name without its prefix, in lower
// case ("rsa_pss_rsae_sha256", "ecdsa_sha256", "ed25519"). Unknown values
// are shown as their number.
func SchemeName(wire keylessv1.SignatureAlgorithm) string {
	if _, ok := keylessv1.SignatureAlgorithm_name[int32(wire)]; !ok {
		return fmt.Sprintf("%d", int32(wire))
	}
	return strings.ToLower(strings.TrimPrefix(wire.String(), "SIGNATURE_ALGORITHM_"))
}

// WithCertificates returns a copy of the policy whose cert: patterns match
// the keys of the given certificates: names maps a key id to the DNS names
// of the certificates that use the key. Without it, cert: patterns match
// nothing. Names are compared case-insensitively, without a trailing dot.
func (p *Policy) WithCertificates(names map[link.KeyID][]string) *Policy {
	q := *p
	q.certFiles = nil
	q.certs = make(map[link.KeyID][]string, len(names))
	for id, list := range names {
		for _, n := range list {
			if n = hostname.Normalize(n); n != "" && !slices.Contains(q.certs[id], n) {
				q.certs[id] = append(q.certs[id], n)
			}
		}
	}
	return &q
}

// WithCertificateFiles is [Policy.WithCertificates] for the leaf
// certificates of files: their DNS names map to their keys. The files are
// kept for [Policy.Lint], which warns, naming the file, about one that
// could not be used, one that has expired or is not valid yet (its names
// still count: the edge serving it is what is wrong), and one whose key
// the keyserver does not hold.
func (p *Policy) WithCertificateFiles(files []CertificateFile) *Policy {
	names := make(map[link.KeyID][]string)
	for _, f := range files {
		if f.Leaf == nil {
			continue
		}
		if id, err := link.KeyIDOf(f.Leaf.PublicKey); err == nil {
			names[id] = append(names[id], f.Leaf.DNSNames...)
		}
	}
	q := p.WithCertificates(names)
	q.certFiles = slices.Clone(files)
	return q
}

// CertificateNames returns the names a client certificate presents as its
// identity, in the order a policy considers them: its URI SANs (such as a
// SPIFFE id) with scheme and host in lower case and the rest as written
// (no other normalization), then its DNS SANs in lower case without a trailing
// dot. The subject common name is not used.
//
// Names that no policy identity of their type can be are left out: a URI
// SAN without a scheme and a host, and a DNS SAN with ':' or '/' (x509
// accepts any text there). So a DNS SAN never passes for a URI identity,
// nor a URI SAN for a DNS one.
func CertificateNames(cert *x509.Certificate) []string {
	if cert == nil {
		return nil
	}
	var names []string
	for _, u := range cert.URIs {
		if u.Scheme != "" && u.Host != "" {
			names = append(names, normalizeURI(u))
		}
	}
	for _, d := range cert.DNSNames {
		if !strings.ContainsAny(d, ":/") {
			names = append(names, hostname.Normalize(d))
		}
	}
	return names
}

// normalizeURI returns the form in which URI identities are compared, in a
// policy and in a certificate alike: the URI as it prints (url.URL.String),
// with its scheme and host in lower case, which RFC 3986 (section 6.2.2.1)
// makes case-insensitive and SPIFFE requires in lower case. Everything
// else, user info, port, path, query and fragment, is compared exactly:
// no case folding, no percent-decoding ("/%61" is not "/a"), no removal of
// dot segments or default ports.
func normalizeURI(u *url.URL) string {
	v := *u
	v.Scheme = strings.ToLower(v.Scheme)
	v.Host = strings.ToLower(v.Host)
	return v.String()
}

// Identify returns the first of names (as [CertificateNames] orders them)
// that the policy names in a rule: the caller's identity. It returns false
// if none is on this allow-list, or if the deny list names any of them or
// is "*".
func (p *Policy) Identify(names []string) (string, bool) {
	if id, ok, _ := p.admit(names); ok {
		return id, true
	}
	return "", false
}

// admit is Identify, with the name to record and the reason for a refusal:
// the deny list comes first, and names a certificate by any of its names
// (an edge cut off by one name must not get in by another); then the
// first listed name is the identity. When refused, id is the denied name,
// or the first name, or "".
func (p *Policy) admit(names []string) (id string, ok bool, reason string) {
	if p.denyAll {
		if len(names) > 0 {
			id = names[0]
		}
		return id, false, fmt.Sprintf("the deny list of policy %s (line %d) denies every identity (\"*\")", p.source, p.denyLine)
	}
	for _, n := range names {
		if p.deny[n] {
			return n, false, fmt.Sprintf("identity %q is on the deny list of policy %s (line %d)", n, p.source, p.denyLine)
		}
	}
	for _, n := range names {
		if p.listed[n] {
			return n, true, ""
		}
	}
	if len(names) > 0 {
		id = names[0]
	}
	if len(p.rules) == 0 {
		return id, false, fmt.Sprintf("policy %s has no rules, so it denies every identity", p.source)
	}
	return id, false, notListed(names)
}

// Identities returns the allow-list: every identity some rule names and
// the deny list does not, sorted.
func (p *Policy) Identities() []string {
	out := make([]string, 0, len(p.listed))
	if p.denyAll {
		return out
	}
	for id := range p.listed {
		if !p.deny[id] {
			out = append(out, id)
		}
	}
	sort.Strings(out)
	return out
}

// IdentityGroup returns the groups of the policy that list identity,
// sorted and joined with ",": a bounded label for metrics. It is "none" for
// an identity on the allow-list that no group names, and "unlisted" for
// one that is not on the allow-list at all (or empty).
func (p *Policy) IdentityGroup(identity string) string {
	if identity == "" || !p.listed[identity] {
		return "unlisted"
	}
	if g, ok := p.identityGroups[identity]; ok {
		return g
	}
	return p.identityGroup(identity)
}

// identityGroup computes IdentityGroup for a listed identity.
func (p *Policy) identityGroup(identity string) string {
	var in []string
	for name, members := range p.groups {
		for _, m := range members {
			if m == identity {
				in = append(in, name)
				break
			}
		}
	}
	if len(in) == 0 {
		return "none"
	}
	sort.Strings(in)
	return strings.Join(in, ",")
}

// keyRef is what the policy knows of a key.
type keyRef struct {
	id    link.KeyID
	label string
}

func refOf(id link.KeyID, key crypto.Signer) keyRef {
	r := keyRef{id: id}
	if d, ok := key.(Describer); ok {
		r.label = d.Label()
	}
	return r
}

func (p *Policy) matchKey(kp keyPattern, k keyRef) bool {
	switch kp.kind {
	case keyAny:
		return true
	case keyByID:
		return kp.id == k.id
	case keyByLabel:
		return k.label != "" && kp.value == k.label
	case keyByCert:
		for _, n := range p.certs[k.id] {
			if hostname.Match(kp.value, n) {
				return true
			}
		}
	}
	return false
}

// rulesFor returns the rules that name identity and match key, in file
// order.
func (p *Policy) rulesFor(identity string, k keyRef) []*policyRule {
	var out []*policyRule
	for _, r := range p.rules {
		if !r.identities[identity] {
			continue
		}
		for _, kp := range r.keys {
			if p.matchKey(kp, k) {
				out = append(out, r)
				break
			}
		}
	}
	return out
}

// authorize decides whether identity may perform op (with alg, for sign)
// with key k. It returns the name of the rule that allows it, or a
// *PermissionError naming the rule that applied (the first rule for this
// identity and key). When no rule covers the key, the key does not exist
// for identity: the error is then a *KeyNotFoundError.
func (p *Policy) authorize(identity string, k keyRef, op string, alg link.Algorithm) (string, error) {
	rules := p.rulesFor(identity, k)
	if len(rules) == 0 {
		return "", &KeyNotFoundError{Identity: identity, ByPolicy: true,
			Reason: fmt.Sprintf("not allowed by policy: no rule allows identity %q to use key %s", identity, link.FormatKeyID(k.id))}
	}
	for _, r := range rules {
		switch {
		case op == OpDecrypt && r.decrypt:
			return r.name, nil
		case op == OpSign && r.sign && r.schemes[alg.Wire]:
			return r.name, nil
		}
	}
	if op == OpDecrypt {
		return rules[0].name, &PermissionError{Identity: identity, Rule: rules[0].name,
			Reason: fmt.Sprintf("%s not allow decrypt with key %s (premaster decryption must be named in operations)", ruleNames(rules), link.FormatKeyID(k.id))}
	}
	var signers []*policyRule
	for _, r := range rules {
		if r.sign {
			signers = append(signers, r)
		}
	}
	if len(signers) == 0 {
		return rules[0].name, &PermissionError{Identity: identity, Rule: rules[0].name,
			Reason: fmt.Sprintf("%s not allow sign with key %s", ruleNames(rules), link.FormatKeyID(k.id))}
	}
	reason := fmt.Sprintf("%s not allow scheme %s with key %s", ruleNames(signers), SchemeName(alg.Wire), link.FormatKeyID(k.id))
	if alg.Legacy {
		reason += " (SHA-1 schemes are allowed only where a rule names them)"
	}
	return signers[0].name, &PermissionError{Identity: identity, Rule: signers[0].name, Reason: reason}
}

// ruleNames returns `rule "a" does` or `rules "a", "b" do`.
func ruleNames(rules []*policyRule) string {
	if len(rules) == 1 {
		return fmt.Sprintf("rule %q does", rules[0].name)
	}
	q := make([]string, len(rules))
	for i, r := range rules {
		q[i] = fmt.Sprintf("%q", r.name)
	}
	return "rules " + strings.Join(q, ", ") + " do"
}

// grants is what the policy lets one identity do with one key: the union
// of the rules that name both.
type grants struct {
	sign, decrypt bool
	schemes       map[keylessv1.SignatureAlgorithm]bool
}

func (p *Policy) grantsFor(identity string, k keyRef) (grants, bool) {
	rules := p.rulesFor(identity, k)
	if len(rules) == 0 {
		return grants{}, false
	}
	g := grants{schemes: make(map[keylessv1.SignatureAlgorithm]bool)}
	for _, r := range rules {
		g.decrypt = g.decrypt || r.decrypt
		if r.sign {
			g.sign = true
			for a := range r.schemes {
				g.schemes[a] = true
			}
		}
	}
	return g, true
}

// quotaFor returns the first quota of the policy that names identity.
func (p *Policy) quotaFor(identity string) (*policyQuota, bool) {
	for _, q := range p.quotas {
		if q.identities[identity] {
			return q, true
		}
	}
	return nil, false
}

// Lint returns warnings about a policy that parses but probably does not
// do what its author meant, given the keys the keyserver holds: a cert:
// pattern that no certificate name matches (the keyserver was given no
// certificates, or none with that name), id: and label: patterns that match
// no key, a label: pattern that matches several keys (it would also cover
// any key added later with that label), the certificate files of
// [Policy.WithCertificateFiles] that are unusable, expired, not yet valid
// or for a key the keyserver does not hold, identities named only by
// quotas, unused groups, and a deny list or rules that deny everyone. The
// keyserver logs them at startup and at each reload.
func (p *Policy) Lint(keys []crypto.Signer) []string {
	var warnings []string
	refs := make([]keyRef, 0, len(keys))
	for _, k := range keys {
		if id, err := link.KeyIDOf(k.Public()); err == nil {
			refs = append(refs, refOf(id, k))
		}
	}
	for _, r := range p.rules {
		for _, kp := range r.keys {
			if kp.kind == keyAny {
				continue
			}
			var matched []string
			for _, k := range refs {
				if p.matchKey(kp, k) {
					matched = append(matched, link.FormatKeyID(k.id))
				}
			}
			if kp.kind == keyByLabel && len(matched) > 1 {
				slices.Sort(matched)
				warnings = append(warnings, fmt.Sprintf("policy %s: line %d: rule %q: key pattern %q matches %d keys (%s), and would match any key added to the token with that label; name each key with id: instead",
					p.source, r.line, r.name, kp.text, len(matched), strings.Join(matched, ", ")))
			}
			if len(matched) > 0 {
				continue
			}
			msg := fmt.Sprintf("policy %s: line %d: rule %q: key pattern %q matches no key the keyserver holds", p.source, r.line, r.name, kp.text)
			if kp.kind == keyByCert {
				if len(p.certs) == 0 {
					msg += " (the keyserver was given no certificates, so cert: patterns match nothing; give it -certs DIR)"
				} else {
					msg += " (no certificate given to the keyserver has a matching DNS name for a key it holds)"
				}
			}
			warnings = append(warnings, msg)
		}
	}
	warnings = append(warnings, p.lintCertificateFiles(refs, time.Now())...)
	for _, q := range p.quotas {
		for id := range q.identities {
			if !p.listed[id] {
				warnings = append(warnings, fmt.Sprintf("policy %s: line %d: quota %q names identity %q, which no rule allows", p.source, q.line, q.name, id))
			}
		}
	}
	for _, g := range p.unusedGroups {
		warnings = append(warnings, fmt.Sprintf("policy %s: group %q is used by no rule or quota", p.source, g))
	}
	switch {
	case len(p.rules) == 0:
		warnings = append(warnings, fmt.Sprintf("policy %s: rules is empty: every identity is denied", p.source))
	case p.denyAll:
		warnings = append(warnings, fmt.Sprintf("policy %s: line %d: deny: \"*\": every identity is denied", p.source, p.denyLine))
	case len(p.deny) > 0:
		denied := make([]string, 0, len(p.deny))
		for id := range p.deny {
			denied = append(denied, id)
		}
		sort.Strings(denied)
		warnings = append(warnings, fmt.Sprintf("policy %s: line %d: deny: these identities are denied whatever the rules say: %s", p.source, p.denyLine, strings.Join(denied, ", ")))
	}
	return warnings
}

// lintCertificateFiles checks the certificate files at now against the
// keys the keyserver holds.
func (p *Policy) lintCertificateFiles(refs []keyRef, now time.Time) []string {
	var warnings []string
	for _, f := range p.certFiles {
		if f.Leaf == nil {
			warnings = append(warnings, fmt.Sprintf("certificate file %s is not used for cert: patterns: %v", f.Path, f.Err))
			continue
		}
		switch {
		case now.After(f.Leaf.NotAfter):
			warnings = append(warnings, fmt.Sprintf("certificate file %s expired on %s; cert: patterns still match its names (%s): replace or remove it", f.Path, f.Leaf.NotAfter.UTC().Format(time.RFC3339), strings.Join(f.Leaf.DNSNames, ", ")))
		case now.Before(f.Leaf.NotBefore):
			warnings = append(warnings, fmt.Sprintf("certificate file %s is not valid before %s; cert: patterns already match its names (%s)", f.Path, f.Leaf.NotBefore.UTC().Format(time.RFC3339), strings.Join(f.Leaf.DNSNames, ", ")))
		}
		id, err := link.KeyIDOf(f.Leaf.PublicKey)
		if err != nil {
			warnings = append(warnings, fmt.Sprintf("certificate file %s has a key of no type the keyserver serves: %v", f.Path, err))
			continue
		}
		if !slices.ContainsFunc(refs, func(k keyRef) bool { return k.id == id }) {
			warnings = append(warnings, fmt.Sprintf("certificate file %s is for key %s, which the keyserver does not hold (not on the token, or not selected)", f.Path, link.FormatKeyID(id)))
		}
	}
	return warnings
}

// String describes the policy for the startup log: its source and counts.
func (p *Policy) String() string {
	s := fmt.Sprintf("policy %s: %d rules, %d identities, %d quotas", p.source, len(p.rules), len(p.listed), len(p.quotas))
	switch {
	case p.denyAll:
		s += ", deny: every identity"
	case len(p.deny) > 0:
		s += fmt.Sprintf(", deny: %d identities", len(p.deny))
	}
	return s
}
