package signer

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"net/url"
	"regexp"
	"sort"
	"strings"
	"unicode"
	"unicode/utf8"

	"go.yaml.in/yaml/v3"

	"github.com/keyless-tls/keyless/internal/hostname"
	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// The YAML document. Field names are what operators write.
type policyFile struct {
	Deny   []string            `yaml:"deny"`
	Groups map[string][]string `yaml:"groups"`
	Rules  []ruleFile          `yaml:"rules"`
	Quotas []quotaFile         `yaml:"quotas"`
}

type ruleFile struct {
	Name       string   `yaml:"name"`
	Identities []string `yaml:"identities"`
	Keys       []string `yaml:"keys"`
	Operations []string `yaml:"operations"`
	Schemes    []string `yaml:"schemes"`
}

type quotaFile struct {
	Name        string   `yaml:"name"`
	Identities  []string `yaml:"identities"`
	MaxInFlight *int     `yaml:"max_inflight"`
	Rate        *float64 `yaml:"rate"`
	Burst       *int     `yaml:"burst"`
}

// yamlTypes names the document's parts in yaml's strict-decoding errors,
// with the fields each may have.
var yamlTypes = map[string]string{
	"signer.policyFile": "the policy (want deny, groups, rules, quotas)",
	"signer.ruleFile":   "a rule (want name, identities, keys, operations, schemes)",
	"signer.quotaFile":  "a quota (want name, identities, max_inflight, rate, burst)",
}

var (
	unknownFieldRE = regexp.MustCompile(`^line (\d+): field (.+) not found in type (\S+)$`)
	nameRE         = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)
)

// maxIdentityLen bounds a literal identity; certificate names are far
// shorter in practice.
const maxIdentityLen = 1024

// PolicyError reports a policy document that cannot be used. Line is the
// line of the offending part (0 if unknown), Where names it ("rule
// \"eu-web\": keys[1]") and Reason says what is wrong.
type PolicyError struct {
	Source string
	Line   int
	Where  string
	Reason string
}

func (e *PolicyError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "signer: policy %s", e.Source)
	if e.Line > 0 {
		fmt.Fprintf(&b, ": line %d", e.Line)
	}
	if e.Where != "" {
		fmt.Fprintf(&b, ": %s", e.Where)
	}
	fmt.Fprintf(&b, ": %s", e.Reason)
	return b.String()
}

// ParsePolicy parses a YAML policy document. source names it in errors
// (usually the file name). Decoding is strict: unknown fields, values of
// the wrong type, duplicate keys and a second document are errors naming
// the line. The rules are then checked, and the first problem is returned
// as a *[PolicyError] naming the rule and field: a missing or duplicate
// name, an identity that is neither a DNS name nor a URI, an unknown group,
// a key pattern that is not "*", id:<64 hex digits>, label:<label> or
// cert:<name or *.name>, an unknown operation or scheme, schemes on a rule
// that does not allow sign, and quotas out of range.
//
// The deny list (deny: identities, group:NAME or "*" for everyone) is
// checked before every rule: see [Policy.Identify]. A document without a
// rules field is an error, but an explicit empty list, rules: [], is a
// policy that denies everyone, which [Policy.Lint] warns about.
func ParsePolicy(source string, data []byte) (*Policy, error) {
	ps := &policyParser{
		source: source,
		p:      &Policy{source: source, groups: make(map[string][]string), listed: make(map[string]bool), deny: make(map[string]bool)},
		used:   make(map[string]bool),
	}
	f, err := ps.decode(data)
	if err != nil {
		return nil, err
	}
	if err := ps.parseGroups(f.Groups); err != nil {
		return nil, err
	}
	if err := ps.parseDeny(f.Deny); err != nil {
		return nil, err
	}
	if err := ps.parseRules(f.Rules); err != nil {
		return nil, err
	}
	if err := ps.parseQuotas(f.Quotas); err != nil {
		return nil, err
	}
	return ps.finish(), nil
}

// policyParser builds a Policy from one document, part by part, failing
// at the first problem with a *PolicyError that names the source, the line
// and the field.
type policyParser struct {
	source string
	lines  policyLines
	p      *Policy
	// groupNames are the document's group names, sorted.
	groupNames []string
	// used holds the groups that some rule or quota names.
	used map[string]bool
}

// errorf returns a *PolicyError for the part at line named where.
func (ps *policyParser) errorf(line int, where, format string, args ...any) error {
	return &PolicyError{Source: ps.source, Line: line, Where: where, Reason: fmt.Sprintf(format, args...)}
}

// decode decodes data strictly into a policyFile and finds the lines of
// its parts.
func (ps *policyParser) decode(data []byte) (*policyFile, error) {
	if !utf8.Valid(data) {
		return nil, ps.errorf(0, "", "not valid UTF-8")
	}
	var f policyFile
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&f); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, ps.errorf(0, "", "the document is empty; a policy needs at least one rule (everything else is denied)")
		}
		return nil, ps.errorf(0, "", "%s", yamlError(err))
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return nil, ps.errorf(extra.Line, "", "a policy is one YAML document; remove everything after the first \"---\" separator")
	}
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return nil, ps.errorf(0, "", "%s", yamlError(err))
	}
	ps.lines = sectionLines(&root)
	return &f, nil
}

// parseGroups checks the groups and their members, in name order.
func (ps *policyParser) parseGroups(groups map[string][]string) error {
	ps.groupNames = make([]string, 0, len(groups))
	for name := range groups {
		ps.groupNames = append(ps.groupNames, name)
	}
	sort.Strings(ps.groupNames)
	for _, name := range ps.groupNames {
		if err := ps.parseGroup(name, groups[name]); err != nil {
			return err
		}
	}
	return nil
}

func (ps *policyParser) parseGroup(name string, members []string) error {
	where := fmt.Sprintf("groups: %q", name)
	line := ps.lines.group[name]
	if !nameRE.MatchString(name) {
		return ps.errorf(line, where, "a group name is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit")
	}
	if len(members) == 0 {
		return ps.errorf(line, where, "the group is empty")
	}
	for i, m := range members {
		if strings.HasPrefix(m, "group:") {
			return ps.errorf(line, fmt.Sprintf("%s[%d]", where, i), "%q: a group holds identities, not other groups", m)
		}
		id, err := parseIdentity(m)
		if err != nil {
			return ps.errorf(line, fmt.Sprintf("%s[%d]", where, i), "%v", err)
		}
		ps.p.groups[name] = append(ps.p.groups[name], id)
	}
	return nil
}

// parseIdentities resolves the identities of a rule or quota, literal or
// group:NAME, into a set of normalized identities.
func (ps *policyParser) parseIdentities(line int, where string, list []string) (map[string]bool, error) {
	if len(list) == 0 {
		return nil, ps.errorf(line, where, "is empty or missing; name at least one identity or group:NAME")
	}
	out := make(map[string]bool)
	for i, s := range list {
		ids, err := ps.resolveIdentity(line, fmt.Sprintf("%s[%d]", where, i), s)
		if err != nil {
			return nil, err
		}
		for _, id := range ids {
			out[id] = true
		}
	}
	return out, nil
}

// resolveIdentity resolves one entry of a list of identities, named where:
// a literal identity, normalized, or the members of group:NAME.
func (ps *policyParser) resolveIdentity(line int, where, s string) ([]string, error) {
	if g, ok := strings.CutPrefix(s, "group:"); ok {
		members, ok := ps.p.groups[g]
		ps.used[g] = true
		if !ok {
			return nil, ps.errorf(line, where, "%q: no such group (groups: %s)", s, strings.Join(ps.groupNames, ", "))
		}
		return members, nil
	}
	id, err := parseIdentity(s)
	if err != nil {
		return nil, ps.errorf(line, where, "%v", err)
	}
	return []string{id}, nil
}

// parseName checks the name of entry i of the rules or quotas (kind "rule"
// or "quota"; why says who reports the name) and returns how messages name
// the entry from then on. seen maps the names so far to their index.
func (ps *policyParser) parseName(kind string, i, line int, name, why string, seen map[string]int) (string, error) {
	where := fmt.Sprintf("%ss[%d]", kind, i)
	if name == "" {
		return "", ps.errorf(line, where, "name is missing; every %s needs a name, which %s", kind, why)
	}
	if !nameRE.MatchString(name) {
		return "", ps.errorf(line, where+": name", "%q: a %s name is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit", name, kind)
	}
	where = fmt.Sprintf("%s %q", kind, name)
	if prev, dup := seen[name]; dup {
		return "", ps.errorf(line, where, "the name is also used by %ss[%d]; %s names must be unique", kind, prev, kind)
	}
	seen[name] = i
	return where, nil
}

// parseDeny resolves the deny list: identities, group:NAME or "*".
func (ps *policyParser) parseDeny(list []string) error {
	ps.p.denyLine = ps.lines.deny
	for i, s := range list {
		if s == "*" {
			ps.p.denyAll = true
			continue
		}
		ids, err := ps.resolveIdentity(ps.lines.deny, fmt.Sprintf("deny[%d]", i), s)
		if err != nil {
			return err
		}
		for _, id := range ids {
			ps.p.deny[id] = true
		}
	}
	return nil
}

// parseRules checks the rules, in order. A policy needs a rules field;
// an explicit empty list denies everyone.
func (ps *policyParser) parseRules(rules []ruleFile) error {
	if len(rules) == 0 && !ps.lines.rulesList {
		return ps.errorf(0, "rules", "there are no rules; everything would be denied (write rules: [] to deny every identity on purpose)")
	}
	seen := make(map[string]int)
	for i, rf := range rules {
		r, err := ps.parseRule(i, rf, seen)
		if err != nil {
			return err
		}
		ps.p.rules = append(ps.p.rules, r)
	}
	return nil
}

func (ps *policyParser) parseRule(i int, rf ruleFile, seen map[string]int) (*policyRule, error) {
	line := ps.lines.rule(i)
	where, err := ps.parseName("rule", i, line, rf.Name, "denials and the audit trail report", seen)
	if err != nil {
		return nil, err
	}
	r := &policyRule{name: rf.Name, line: line}
	if r.identities, err = ps.parseIdentities(line, where+": identities", rf.Identities); err != nil {
		return nil, err
	}
	for id := range r.identities {
		ps.p.listed[id] = true
	}
	if err := ps.parseOperations(line, where, rf.Operations, r); err != nil {
		return nil, err
	}
	if r.tickets && !r.sign && !r.decrypt {
		// Session ticket keys belong to no key: a tickets-only rule has none.
		if len(rf.Keys) > 0 {
			return nil, ps.errorf(line, where+": keys", "the rule allows only tickets, which uses no key; remove keys, or add sign or decrypt to operations")
		}
	} else if r.keys, err = ps.parseKeys(line, where, rf.Keys); err != nil {
		return nil, err
	}
	if r.schemes, err = ps.parseRuleSchemes(line, where, rf.Schemes, r.sign); err != nil {
		return nil, err
	}
	return r, nil
}

func (ps *policyParser) parseKeys(line int, where string, keys []string) ([]keyPattern, error) {
	if len(keys) == 0 {
		return nil, ps.errorf(line, where+": keys", "is empty or missing; name keys as id:<key id>, label:<CKA_LABEL>, cert:<certificate name> or \"*\" for every key")
	}
	out := make([]keyPattern, 0, len(keys))
	for j, k := range keys {
		kp, err := parseKeyPattern(k)
		if err != nil {
			return nil, ps.errorf(line, fmt.Sprintf("%s: keys[%d]", where, j), "%v", err)
		}
		out = append(out, kp)
	}
	return out, nil
}

// parseOperations sets r.sign and r.decrypt from a rule's operations.
func (ps *policyParser) parseOperations(line int, where string, ops []string, r *policyRule) error {
	if len(ops) == 0 {
		return ps.errorf(line, where+": operations", "is empty or missing; want sign, decrypt, tickets or several")
	}
	for j, op := range ops {
		switch op {
		case OpSign:
			r.sign = true
		case OpDecrypt:
			r.decrypt = true
		case OpTickets:
			r.tickets = true
		default:
			return ps.errorf(line, fmt.Sprintf("%s: operations[%d]", where, j), "%q is not an operation; want sign, decrypt or tickets", op)
		}
	}
	return nil
}

// parseRuleSchemes resolves a rule's schemes, which it must have if it
// allows sign (sign) and must not have otherwise; nil without sign.
func (ps *policyParser) parseRuleSchemes(line int, where string, schemes []string, sign bool) (map[keylessv1.SignatureAlgorithm]bool, error) {
	switch {
	case sign && len(schemes) == 0:
		return nil, ps.errorf(line, where+": schemes", "is empty or missing, but the rule allows sign; write [default] for every scheme but SHA-1, or name schemes")
	case !sign && len(schemes) > 0:
		return nil, ps.errorf(line, where+": schemes", "the rule does not allow sign, so schemes would mean nothing; remove them or add sign to operations")
	case !sign:
		return nil, nil
	}
	out := make(map[keylessv1.SignatureAlgorithm]bool)
	for j, s := range schemes {
		algs, err := parseSchemes(s)
		if err != nil {
			return nil, ps.errorf(line, fmt.Sprintf("%s: schemes[%d]", where, j), "%v", err)
		}
		for _, a := range algs {
			out[a] = true
		}
	}
	return out, nil
}

// parseQuotas checks the quotas, in order.
func (ps *policyParser) parseQuotas(quotas []quotaFile) error {
	seen := make(map[string]int)
	for i, qf := range quotas {
		q, err := ps.parseQuota(i, qf, seen)
		if err != nil {
			return err
		}
		ps.p.quotas = append(ps.p.quotas, q)
	}
	return nil
}

func (ps *policyParser) parseQuota(i int, qf quotaFile, seen map[string]int) (*policyQuota, error) {
	line := ps.lines.quota(i)
	where, err := ps.parseName("quota", i, line, qf.Name, "refusals report", seen)
	if err != nil {
		return nil, err
	}
	q := &policyQuota{name: qf.Name, desc: fmt.Sprintf("quota %q of the policy", qf.Name), line: line}
	if q.identities, err = ps.parseIdentities(line, where+": identities", qf.Identities); err != nil {
		return nil, err
	}
	if q.quota, err = ps.parseLimits(line, where, qf); err != nil {
		return nil, err
	}
	return q, nil
}

// parseLimits checks a quota's max_inflight, rate and burst; it needs at
// least one of the first two.
func (ps *policyParser) parseLimits(line int, where string, qf quotaFile) (Quota, error) {
	var q Quota
	if qf.MaxInFlight == nil && qf.Rate == nil {
		return q, ps.errorf(line, where, "sets no limit; give max_inflight, rate or both")
	}
	if qf.MaxInFlight != nil {
		if *qf.MaxInFlight < 1 {
			return q, ps.errorf(line, where+": max_inflight", "is %d; it must be at least 1", *qf.MaxInFlight)
		}
		q.MaxInFlight = *qf.MaxInFlight
	}
	if qf.Rate != nil {
		if r := *qf.Rate; !(r > 0) || math.IsInf(r, 0) {
			return q, ps.errorf(line, where+": rate", "is %v; it must be a positive number of operations per second", r)
		}
		q.Rate = *qf.Rate
	}
	if qf.Burst != nil {
		if qf.Rate == nil {
			return q, ps.errorf(line, where+": burst", "needs a rate; burst is how many operations may go at once above the rate")
		}
		if *qf.Burst < 1 {
			return q, ps.errorf(line, where+": burst", "is %d; it must be at least 1", *qf.Burst)
		}
		q.Burst = *qf.Burst
	}
	return q, nil
}

// finish computes what the policy derives from its parts and returns it.
func (ps *policyParser) finish() *Policy {
	p := ps.p
	for _, g := range ps.groupNames {
		if !ps.used[g] {
			p.unusedGroups = append(p.unusedGroups, g)
		}
	}
	p.identityGroups = make(map[string]string, len(p.listed))
	for id := range p.listed {
		p.identityGroups[id] = p.identityGroup(id)
	}
	return p
}

// yamlError rewrites yaml's strict-decoding messages in the policy's own
// terms.
func yamlError(err error) string {
	var te *yaml.TypeError
	if !errors.As(err, &te) {
		return strings.TrimPrefix(err.Error(), "yaml: ")
	}
	msgs := make([]string, 0, len(te.Errors))
	for _, m := range te.Errors {
		if sm := unknownFieldRE.FindStringSubmatch(m); sm != nil {
			in := yamlTypes[sm[3]]
			if in == "" {
				in = sm[3]
			}
			m = fmt.Sprintf("line %s: unknown field %q in %s", sm[1], sm[2], in)
		}
		msgs = append(msgs, m)
	}
	return strings.Join(msgs, "; ")
}

// policyLines are the lines of the document's parts, for messages.
type policyLines struct {
	group         map[string]int
	deny          int
	rules, quotas []int
	// rulesList is set when the document's rules field is a list, even
	// an empty one.
	rulesList bool
}

func (l policyLines) rule(i int) int {
	if i < len(l.rules) {
		return l.rules[i]
	}
	return 0
}

func (l policyLines) quota(i int) int {
	if i < len(l.quotas) {
		return l.quotas[i]
	}
	return 0
}

func sectionLines(root *yaml.Node) policyLines {
	l := policyLines{group: make(map[string]int)}
	if root.Kind != yaml.DocumentNode || len(root.Content) == 0 || root.Content[0].Kind != yaml.MappingNode {
		return l
	}
	m := root.Content[0].Content
	for i := 0; i+1 < len(m); i += 2 {
		k, v := m[i], m[i+1]
		switch k.Value {
		case "groups":
			if v.Kind == yaml.MappingNode {
				for j := 0; j+1 < len(v.Content); j += 2 {
					l.group[v.Content[j].Value] = v.Content[j].Line
				}
			}
		case "deny":
			l.deny = k.Line
		case "rules", "quotas":
			l.rulesList = l.rulesList || (k.Value == "rules" && v.Kind == yaml.SequenceNode)
			var lines []int
			if v.Kind == yaml.SequenceNode {
				for _, item := range v.Content {
					lines = append(lines, item.Line)
				}
			}
			if k.Value == "rules" {
				l.rules = lines
			} else {
				l.quotas = lines
			}
		}
	}
	return l
}

// parseIdentity checks a literal identity and returns its normalized form:
// a URI (such as a SPIFFE id) as normalizeURI makes it, or a DNS name in
// lower case without a trailing dot.
func parseIdentity(s string) (string, error) {
	switch {
	case s == "":
		return "", errors.New("an identity is empty")
	case len(s) > maxIdentityLen:
		return "", fmt.Errorf("an identity is %d bytes; at most %d are allowed", len(s), maxIdentityLen)
	case strings.ContainsFunc(s, func(r rune) bool { return unicode.IsSpace(r) || unicode.IsControl(r) }):
		return "", fmt.Errorf("identity %q contains white space or control characters", s)
	case strings.Contains(s, "*"):
		return "", fmt.Errorf("identity %q has a wildcard; identities are the exact DNS or URI names of edge certificates (use a group to name several)", s)
	}
	if strings.Contains(s, "://") {
		u, err := url.Parse(s)
		if err != nil || u.Scheme == "" || u.Host == "" {
			return "", fmt.Errorf("identity %q is not a URI with a scheme and a host, such as spiffe://example.com/edge/1", s)
		}
		return normalizeURI(u), nil
	}
	if strings.Contains(s, ":") || strings.Contains(s, "/") {
		return "", fmt.Errorf("identity %q is neither a DNS name nor a URI (scheme://host/...); for a group write group:NAME", s)
	}
	n := hostname.Normalize(s)
	if n == "" || strings.HasPrefix(n, ".") || strings.Contains(n, "..") {
		return "", fmt.Errorf("identity %q is not a DNS name", s)
	}
	return n, nil
}

// parseKeyPattern parses one entry of a rule's keys: "*",
// id:<64 hex digits>, label:<label> or cert:<name or *.name>.
func parseKeyPattern(s string) (keyPattern, error) {
	if s == "*" {
		return keyPattern{text: s, kind: keyAny}, nil
	}
	prefix, v, ok := strings.Cut(s, ":")
	if !ok {
		return keyPattern{}, fmt.Errorf("%q: want id:<key id>, label:<CKA_LABEL>, cert:<certificate name> or \"*\"", s)
	}
	kp := keyPattern{text: s}
	switch prefix {
	case "id":
		id, err := link.ParseKeyID(strings.ToLower(v))
		if err != nil {
			return keyPattern{}, fmt.Errorf("%q: a key id is the 64 hex digits that \"keyserver keys list\" shows", s)
		}
		kp.kind, kp.id = keyByID, id
	case "label":
		if v == "" {
			return keyPattern{}, fmt.Errorf("%q: the label is empty", s)
		}
		kp.kind, kp.value = keyByLabel, v
	case "cert":
		if err := hostname.CheckPattern(v); err != nil {
			return keyPattern{}, fmt.Errorf("%q: certificate name: %w", s, err)
		}
		kp.kind, kp.value = keyByCert, hostname.Normalize(v)
	default:
		return keyPattern{}, fmt.Errorf("%q: unknown kind %q; want id:, label:, cert: or \"*\"", s, prefix)
	}
	return kp, nil
}

// schemeAliases are the RFC 8446 names of the ECDSA schemes, accepted in a
// policy for the TLS 1.2-style names the wire uses.
var schemeAliases = map[string]string{
	"ecdsa_secp256r1_sha256": "ecdsa_sha256",
	"ecdsa_secp384r1_sha384": "ecdsa_sha384",
	"ecdsa_secp521r1_sha512": "ecdsa_sha512",
}

// parseSchemes resolves one entry of a rule's schemes: "default" (every
// scheme but the SHA-1 ones) or one scheme's name.
func parseSchemes(s string) ([]keylessv1.SignatureAlgorithm, error) {
	name := strings.ToLower(s)
	if name == "default" {
		var out []keylessv1.SignatureAlgorithm
		for _, a := range link.Algorithms() {
			if !a.Legacy {
				out = append(out, a.Wire)
			}
		}
		return out, nil
	}
	if alias, ok := schemeAliases[name]; ok {
		name = alias
	}
	for _, a := range link.Algorithms() {
		if SchemeName(a.Wire) == name {
			return []keylessv1.SignatureAlgorithm{a.Wire}, nil
		}
	}
	if strings.Contains(name, "md5") {
		return nil, fmt.Errorf("%q: MD5-SHA1 signatures exist only in TLS 1.0 and 1.1, which edges do not speak; the keyserver has no such operation", s)
	}
	var names []string
	for _, a := range link.Algorithms() {
		names = append(names, SchemeName(a.Wire))
	}
	return nil, fmt.Errorf("%q is not a signature scheme; want default or one of %s", s, strings.Join(names, ", "))
}
