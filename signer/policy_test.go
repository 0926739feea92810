package signer

import (
	"crypto"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// examplePolicy is the README's example, kept in step with it by
// TestReadmePolicyExample in package e2e... and parsed here.
const examplePolicy = `# Who may use which keys for what. Anything not allowed here is denied.
groups:
  eu-edges: [spiffe://example.com/edge/eu-1, edge-eu-2.example.com]
rules:
  - name: eu-web
    identities: [group:eu-edges]
    keys: [label:www.example.com, cert:*.example.com]
    operations: [sign, decrypt]
    schemes: [default]
  - name: legacy-clients
    identities: [spiffe://example.com/edge/eu-1]
    keys: [label:www.example.com]
    operations: [sign]
    schemes: [rsa_pkcs1_sha1]
quotas:
  - name: eu
    identities: [group:eu-edges]
    max_inflight: 16
    rate: 500
    burst: 100
`

func TestParsePolicy(t *testing.T) {
	p, err := ParsePolicy("example.yaml", []byte(examplePolicy))
	if err != nil {
		t.Fatalf("ParsePolicy(example) = %v", err)
	}
	if got := strings.Join(p.Identities(), " "); got != "edge-eu-2.example.com spiffe://example.com/edge/eu-1" {
		t.Errorf("Identities() = %q", got)
	}
	if len(p.rules) != 2 || len(p.quotas) != 1 {
		t.Fatalf("parsed %d rules and %d quotas, want 2 and 1", len(p.rules), len(p.quotas))
	}
	r := p.rules[0]
	if r.name != "eu-web" || r.line != 5 || !r.sign || !r.decrypt || len(r.keys) != 2 || len(r.identities) != 2 {
		t.Errorf("rules[0] = %+v", r)
	}
	for _, a := range link.Algorithms() {
		if r.schemes[a.Wire] == a.Legacy {
			t.Errorf("schemes [default]: %v allowed = %t", a, r.schemes[a.Wire])
		}
	}
	if q := p.quotas[0].quota; q != (Quota{MaxInFlight: 16, Rate: 500, Burst: 100}) {
		t.Errorf("quota = %+v", q)
	}
	if !strings.Contains(p.String(), "2 rules, 2 identities, 1 quotas") {
		t.Errorf("String() = %q", p.String())
	}
}

func TestParsePolicyErrors(t *testing.T) {
	rule := func(fields string) string {
		return "rules:\n  - name: r1\n" + fields
	}
	const ok = "    identities: [edge.example.com]\n    keys: [\"*\"]\n    operations: [sign]\n    schemes: [default]\n"
	tests := []struct {
		name string
		doc  string
		want []string // substrings of the error
	}{
		{"empty", "", []string{"empty", "at least one rule"}},
		{"only comments", "# nothing\n", []string{"empty"}},
		{"no rules", "groups:\n  g: [a.example]\n", []string{"rules", "no rules"}},
		{"not a mapping", "- a\n- b\n", []string{"cannot unmarshal"}},
		{"unknown top-level field", "rule: []\n", []string{"line 1", `unknown field "rule"`, "the policy"}},
		{"unknown rule field", rule(ok + "    identites: [x.example]\n"), []string{"line 7", `unknown field "identites"`, "a rule (want name, identities"}},
		{"unknown quota field", rule(ok) + "quotas:\n  - name: q\n    identities: [edge.example.com]\n    max_in_flight: 3\n", []string{"line 10", `unknown field "max_in_flight"`, "a quota"}},
		{"wrong type", rule("    identities: edge.example.com\n    keys: [\"*\"]\n    operations: [sign]\n    schemes: [default]\n"), []string{"line 3", "cannot unmarshal"}},
		{"duplicate key", rule(ok + "    keys: [\"*\"]\n"), []string{"line 7", `"keys" already defined`}},
		{"two documents", rule(ok) + "---\nrules: []\n", []string{"one YAML document"}},
		{"not UTF-8", "rules: [\xff]\n", []string{"UTF-8"}},

		{"rule without name", "rules:\n  - identities: [a.example]\n    keys: [\"*\"]\n    operations: [sign]\n    schemes: [default]\n", []string{"line 2", "rules[0]", "name is missing"}},
		{"rule bad name", "rules:\n  - name: \"eu web\"\n" + ok, []string{"rules[0]: name", `"eu web"`}},
		{"rule duplicate name", rule(ok) + "  - name: r1\n" + ok, []string{"line 7", `rule "r1"`, "also used by rules[0]"}},
		{"no identities", rule("    keys: [\"*\"]\n    operations: [sign]\n    schemes: [default]\n"), []string{`rule "r1": identities`, "is empty or missing"}},
		{"identity wildcard", rule(strings.Replace(ok, "edge.example.com", "\"*.example.com\"", 1)), []string{`rule "r1": identities[0]`, "wildcard"}},
		{"identity with space", rule(strings.Replace(ok, "[edge.example.com]", "[\"edge example\"]", 1)), []string{"identities[0]", "white space"}},
		{"identity not a URI", rule(strings.Replace(ok, "edge.example.com", "spiffe://", 1)), []string{"identities[0]", "not a URI"}},
		{"identity neither", rule(strings.Replace(ok, "edge.example.com", "edge:8443", 1)), []string{"identities[0]", "neither a DNS name nor a URI"}},
		{"identity empty", rule(strings.Replace(ok, "[edge.example.com]", "[\"\"]", 1)), []string{"identities[0]", "empty"}},
		{"identity bad DNS", rule(strings.Replace(ok, "edge.example.com", "a..b", 1)), []string{"identities[0]", "not a DNS name"}},
		{"identity too long", rule(strings.Replace(ok, "edge.example.com", strings.Repeat("a", 1025), 1)), []string{"identities[0]", "1025 bytes"}},
		{"unknown group", rule(strings.Replace(ok, "edge.example.com", "group:nope", 1)), []string{"identities[0]", `"group:nope": no such group`}},
		{"empty group", "groups:\n  g: []\n" + rule(ok), []string{"line 2", `groups: "g"`, "empty"}},
		{"bad group name", "groups:\n  \"a b\": [x.example]\n" + rule(ok), []string{`groups: "a b"`, "group name"}},
		{"nested group", "groups:\n  g: [group:h]\n  h: [x.example]\n" + rule(ok), []string{`groups: "g"[0]`, "not other groups"}},
		{"bad group member", "groups:\n  g: [\"*\"]\n" + rule(ok), []string{`groups: "g"[0]`, "wildcard"}},
		{"no keys", rule("    identities: [a.example]\n    operations: [sign]\n    schemes: [default]\n"), []string{`rule "r1": keys`, "empty or missing"}},
		{"key kind unknown", rule(strings.Replace(ok, `"*"`, "lable:www", 1)), []string{`rule "r1": keys[0]`, `unknown kind "lable"`}},
		{"key no kind", rule(strings.Replace(ok, `"*"`, "www.example.com", 1)), []string{"keys[0]", "want id:"}},
		{"key id short", rule(strings.Replace(ok, `"*"`, "id:3f2a", 1)), []string{"keys[0]", "64 hex digits"}},
		{"key id not hex", rule(strings.Replace(ok, `"*"`, "id:"+strings.Repeat("zz", 32), 1)), []string{"keys[0]", "64 hex digits"}},
		{"key label empty", rule(strings.Replace(ok, `"*"`, "\"label:\"", 1)), []string{"keys[0]", "label is empty"}},
		{"key cert empty", rule(strings.Replace(ok, `"*"`, "\"cert:\"", 1)), []string{"keys[0]", "the name is empty"}},
		{"key cert bare wildcard", rule(strings.Replace(ok, `"*"`, "\"cert:*.\"", 1)), []string{"keys[0]", "nothing follows the wildcard"}},
		{"key cert inner wildcard", rule(strings.Replace(ok, `"*"`, "\"cert:a.*.example.com\"", 1)), []string{"keys[0]", "whole first label"}},
		{"no operations", rule("    identities: [a.example]\n    keys: [\"*\"]\n"), []string{`rule "r1": operations`, "want sign, decrypt"}},
		{"unknown operation", rule(strings.Replace(ok, "[sign]", "[sign, encrypt]", 1)), []string{`rule "r1": operations[1]`, `"encrypt" is not an operation`}},
		{"sign without schemes", rule("    identities: [a.example]\n    keys: [\"*\"]\n    operations: [sign]\n"), []string{`rule "r1": schemes`, "[default]"}},
		{"schemes without sign", rule("    identities: [a.example]\n    keys: [\"*\"]\n    operations: [decrypt]\n    schemes: [default]\n"), []string{`rule "r1": schemes`, "does not allow sign"}},
		{"unknown scheme", rule(strings.Replace(ok, "[default]", "[default, rsa_pss_sha256]", 1)), []string{`rule "r1": schemes[1]`, `"rsa_pss_sha256" is not a signature scheme`, "rsa_pss_rsae_sha256"}},
		{"md5sha1 scheme", rule(strings.Replace(ok, "[default]", "[rsa_pkcs1_md5sha1]", 1)), []string{"schemes[0]", "MD5-SHA1", "TLS 1.0 and 1.1"}},

		{"quota without name", rule(ok) + "quotas:\n  - identities: [a.example]\n    max_inflight: 1\n", []string{"line 8", "quotas[0]", "name is missing"}},
		{"quota duplicate name", rule(ok) + "quotas:\n  - name: q\n    identities: [a.example]\n    max_inflight: 1\n  - name: q\n    identities: [a.example]\n    max_inflight: 1\n", []string{`quota "q"`, "also used by quotas[0]"}},
		{"quota bad name", rule(ok) + "quotas:\n  - name: \"-q\"\n    identities: [a.example]\n    max_inflight: 1\n", []string{"quotas[0]: name", "quota name"}},
		{"quota no identities", rule(ok) + "quotas:\n  - name: q\n    max_inflight: 1\n", []string{`quota "q": identities`, "empty or missing"}},
		{"quota unknown group", rule(ok) + "quotas:\n  - name: q\n    identities: [group:g]\n    max_inflight: 1\n", []string{`quota "q": identities[0]`, "no such group"}},
		{"quota no limit", rule(ok) + "quotas:\n  - name: q\n    identities: [a.example]\n", []string{`quota "q"`, "sets no limit"}},
		{"quota zero inflight", rule(ok) + "quotas:\n  - name: q\n    identities: [a.example]\n    max_inflight: 0\n", []string{`quota "q": max_inflight`, "at least 1"}},
		{"quota negative rate", rule(ok) + "quotas:\n  - name: q\n    identities: [a.example]\n    rate: -1\n", []string{`quota "q": rate`, "positive"}},
		{"quota infinite rate", rule(ok) + "quotas:\n  - name: q\n    identities: [a.example]\n    rate: .inf\n", []string{`quota "q": rate`, "positive"}},
		{"quota NaN rate", rule(ok) + "quotas:\n  - name: q\n    identities: [a.example]\n    rate: .nan\n", []string{`quota "q": rate`, "positive"}},
		{"quota burst without rate", rule(ok) + "quotas:\n  - name: q\n    identities: [a.example]\n    max_inflight: 2\n    burst: 3\n", []string{`quota "q": burst`, "needs a rate"}},
		{"quota zero burst", rule(ok) + "quotas:\n  - name: q\n    identities: [a.example]\n    rate: 2\n    burst: 0\n", []string{`quota "q": burst`, "at least 1"}},
		{"quota rate not a number", rule(ok) + "quotas:\n  - name: q\n    identities: [a.example]\n    rate: fast\n", []string{"line 10", "cannot unmarshal"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := ParsePolicy("bad.yaml", []byte(tt.doc))
			if err == nil {
				t.Fatalf("ParsePolicy() = %v, want an error", p)
			}
			msg := err.Error()
			if !strings.HasPrefix(msg, "signer: policy bad.yaml: ") {
				t.Errorf("ParsePolicy() = %q, want it to start with the source", msg)
			}
			var perr *PolicyError
			if !errors.As(err, &perr) {
				t.Errorf("ParsePolicy() = %T, want a *PolicyError", err)
			}
			for _, w := range tt.want {
				if !strings.Contains(msg, w) {
					t.Errorf("ParsePolicy() = %q, want it to contain %q", msg, w)
				}
			}
		})
	}
}

func TestParseKeyPattern(t *testing.T) {
	id := strings.Repeat("3f", 32)
	tests := []struct {
		in       string
		kind     keyPatternKind
		wantKind string
		value    string
	}{
		{"*", keyAny, "*", ""},
		{"id:" + id, keyByID, "id", ""},
		{"id:" + strings.ToUpper(id), keyByID, "id", ""},
		{"label:www", keyByLabel, "label", "www"},
		{"cert:*.Example.COM.", keyByCert, "cert", "*.example.com"},
	}
	for _, tt := range tests {
		kp, err := parseKeyPattern(tt.in)
		if err != nil || kp.kind != tt.kind || kp.text != tt.in || kp.value != tt.value {
			t.Errorf("parseKeyPattern(%q) = %+v, %v, want kind %v, value %q", tt.in, kp, err, tt.kind, tt.value)
		}
		if got := kp.kind.String(); got != tt.wantKind {
			t.Errorf("parseKeyPattern(%q).kind.String() = %q, want %q", tt.in, got, tt.wantKind)
		}
		if tt.kind == keyByID && link.FormatKeyID(kp.id) != id {
			t.Errorf("parseKeyPattern(%q).id = %s, want %s", tt.in, link.FormatKeyID(kp.id), id)
		}
	}
	for _, bad := range []string{"", "**", "id:", "lable:www", "label:", "cert:"} {
		if kp, err := parseKeyPattern(bad); err == nil {
			t.Errorf("parseKeyPattern(%q) = %+v, nil, want an error", bad, kp)
		}
	}
	if got := keyPatternKind(0).String(); got != "keyPatternKind(0)" {
		t.Errorf("keyPatternKind(0).String() = %q", got)
	}
}

func TestParseSchemes(t *testing.T) {
	tests := []struct {
		in   string
		want keylessv1.SignatureAlgorithm
	}{
		{"rsa_pss_rsae_sha256", keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PSS_RSAE_SHA256},
		{"RSA_PKCS1_SHA1", keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PKCS1_SHA1},
		{"ecdsa_sha1", keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ECDSA_SHA1},
		{"ecdsa_secp384r1_sha384", keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ECDSA_SHA384},
		{"ed25519", keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ED25519},
	}
	for _, tt := range tests {
		got, err := parseSchemes(tt.in)
		if err != nil || len(got) != 1 || got[0] != tt.want {
			t.Errorf("parseSchemes(%q) = %v, %v, want %v", tt.in, got, err, tt.want)
		}
	}
	// Every scheme of the table has a name that parses back to it.
	for _, a := range link.Algorithms() {
		got, err := parseSchemes(SchemeName(a.Wire))
		if err != nil || len(got) != 1 || got[0] != a.Wire {
			t.Errorf("parseSchemes(SchemeName(%v)) = %v, %v", a, got, err)
		}
	}
	if got := SchemeName(9999); got != "9999" {
		t.Errorf("SchemeName(9999) = %q", got)
	}
}

// labeled is a key with a CKA_LABEL.
type labeled struct {
	crypto.Signer
	label string
}

func (k labeled) Label() string    { return k.label }
func (k labeled) ObjectID() []byte { return nil }

func TestPolicyAuthorize(t *testing.T) {
	rsaID := link.KeyID(mustKeyID(t, testRSAKey().Public()))
	p256ID := link.KeyID(mustKeyID(t, testP256Key().Public()))
	p384ID := link.KeyID(mustKeyID(t, testP384Key().Public()))
	edID := link.KeyID(mustKeyID(t, testEd25519Key().Public()))
	p := mustPolicy(t, fmt.Sprintf(`
groups:
  web: [spiffe://example.com/edge/1, edge-2.example.com]
rules:
  - name: web-sign
    identities: [group:web]
    keys: [label:www.example.com, cert:*.example.com]
    operations: [sign]
    schemes: [default]
  - name: web-decrypt
    identities: [spiffe://example.com/edge/1]
    keys: [label:www.example.com]
    operations: [decrypt]
  - name: legacy
    identities: [edge-2.example.com]
    keys: [id:%x]
    operations: [sign]
    schemes: [rsa_pkcs1_sha1, ecdsa_secp256r1_sha256]
  - name: ops
    identities: [ops.example.com]
    keys: ["*"]
    operations: [sign]
    schemes: [ed25519]
`, rsaID)).WithCertificates(map[link.KeyID][]string{
		p256ID: {"API.example.com."},
		p384ID: {"www.example.org", "a.b.example.com"},
	})
	rsa := refOf(rsaID, labeled{testRSAKey(), "www.example.com"})
	p256 := refOf(p256ID, testP256Key())
	p384 := refOf(p384ID, testP384Key())
	ed := refOf(edID, labeled{testEd25519Key(), "WWW.example.com"}) // labels are exact
	alg := func(w keylessv1.SignatureAlgorithm) link.Algorithm {
		a, ok := link.AlgorithmFor(w)
		if !ok {
			t.Fatalf("no algorithm %v", w)
		}
		return a
	}
	pss := alg(keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PSS_RSAE_SHA256)
	sha1 := alg(keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PKCS1_SHA1)
	ecdsa256 := alg(keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ECDSA_SHA256)
	ed25519 := alg(keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ED25519)
	const (
		edge1 = "spiffe://example.com/edge/1"
		edge2 = "edge-2.example.com"
		ops   = "ops.example.com"
	)
	tests := []struct {
		name     string
		identity string
		key      keyRef
		op       string
		alg      link.Algorithm
		wantRule string
		wantErr  string // "" for allowed
	}{
		{"label sign", edge1, rsa, OpSign, pss, "web-sign", ""},
		{"group member sign", edge2, rsa, OpSign, pss, "web-sign", ""},
		{"cert wildcard sign", edge1, p256, OpSign, ecdsa256, "web-sign", ""},
		{"decrypt named", edge1, rsa, OpDecrypt, link.Algorithm{}, "web-decrypt", ""},
		{"decrypt not named", edge2, rsa, OpDecrypt, link.Algorithm{}, "web-sign", `rules "web-sign", "legacy" do not allow decrypt`},
		{"SHA-1 not named", edge1, rsa, OpSign, sha1, "web-sign", `rule "web-sign" does not allow scheme rsa_pkcs1_sha1`},
		{"SHA-1 named", edge2, rsa, OpSign, sha1, "legacy", ""},
		{"cert pattern two labels", edge1, p384, OpSign, ecdsa256, "", "no rule allows identity \"spiffe://example.com/edge/1\" to use key"},
		{"label case differs", edge1, ed, OpSign, ed25519, "", "no rule allows"},
		{"unknown identity", "stranger.example.com", rsa, OpSign, pss, "", "no rule allows identity \"stranger.example.com\""},
		{"any key but scheme", ops, p256, OpSign, ecdsa256, "ops", `rule "ops" does not allow scheme ecdsa_sha256`},
		{"any key", ops, ed, OpSign, ed25519, "ops", ""},
		{"sign-only rule decrypt", ops, rsa, OpDecrypt, link.Algorithm{}, "ops", `rule "ops" does not allow decrypt`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rule, err := p.authorize(tt.identity, tt.key, tt.op, tt.alg)
			if rule != tt.wantRule {
				t.Errorf("authorize() rule = %q, want %q", rule, tt.wantRule)
			}
			if tt.wantErr == "" {
				if err != nil {
					t.Errorf("authorize() = %v, want allowed", err)
				}
				return
			}
			if tt.wantRule == "" {
				// No rule covers the key: it does not exist for the
				// identity.
				var nferr *KeyNotFoundError
				if !errors.As(err, &nferr) || !nferr.ByPolicy || !strings.HasPrefix(nferr.Reason, "not allowed by policy: ") ||
					!strings.Contains(err.Error(), tt.wantErr) || nferr.Identity != tt.identity || !errors.Is(err, ErrKeyNotFound) {
					t.Errorf("authorize() = %#v, want a KeyNotFoundError by policy containing %q", err, tt.wantErr)
				}
				return
			}
			var perr *PermissionError
			if !errors.As(err, &perr) || !strings.Contains(err.Error(), tt.wantErr) || perr.Rule != tt.wantRule || perr.Identity != tt.identity {
				t.Errorf("authorize() = %#v, want a PermissionError containing %q", err, tt.wantErr)
			}
		})
	}

	// Grants are the union of the rules.
	g, ok := p.grantsFor(edge2, rsa)
	if !ok || !g.sign || g.decrypt || !g.schemes[sha1.Wire] || !g.schemes[pss.Wire] {
		t.Errorf("grantsFor(edge-2, rsa) = %+v, %t", g, ok)
	}
	if _, ok := p.grantsFor(edge1, p384); ok {
		t.Error("grantsFor(edge-1, p384) = ok, want no grants")
	}
}

func TestPolicyLint(t *testing.T) {
	p := mustPolicy(t, fmt.Sprintf(`
groups:
  used: [a.example.com]
  unused: [b.example.com]
rules:
  - name: r
    identities: [group:used]
    keys: [id:%x, id:%x, label:present, label:absent, cert:www.example.com]
    operations: [sign]
    schemes: [default]
quotas:
  - name: q
    identities: [c.example.com]
    max_inflight: 1
`, mustKeyID(t, testRSAKey().Public()), mustKeyID(t, testP384Key().Public())))
	keys := []crypto.Signer{testRSAKey(), labeled{testP256Key(), "present"}}
	got := strings.Join(p.Lint(keys), "\n")
	for _, want := range []string{
		fmt.Sprintf(`line 6: rule "r": key pattern "id:%x" matches no key`, mustKeyID(t, testP384Key().Public())),
		`key pattern "label:absent" matches no key`,
		`key pattern "cert:www.example.com" matches no key the keyserver holds (the keyserver was given no certificates`,
		`quota "q" names identity "c.example.com", which no rule allows`,
		`group "unused" is used by no rule or quota`,
	} {
		if !strings.Contains(got, want) {
			t.Errorf("Lint() =\n%s\nwant a warning containing %q", got, want)
		}
	}
	for _, unwanted := range []string{"label:present", fmt.Sprintf("id:%x\"", mustKeyID(t, testRSAKey().Public())), `"used"`} {
		if strings.Contains(got, unwanted) {
			t.Errorf("Lint() =\n%s\nwarns about %s, which is fine", got, unwanted)
		}
	}
	withCerts := p.WithCertificates(map[link.KeyID][]string{link.KeyID(mustKeyID(t, testP384Key().Public())): {"www.example.com"}})
	if got := strings.Join(withCerts.Lint(keys), "\n"); !strings.Contains(got, "no certificate given to the keyserver has a matching DNS name") {
		t.Errorf("Lint() with certificates of an absent key =\n%s", got)
	}
	if got := strings.Join(withCerts.Lint(append(keys, testP384Key())), "\n"); strings.Contains(got, "cert:") {
		t.Errorf("Lint() with a matching certificate =\n%s", got)
	}
	// WithCertificates does not change the original.
	if len(p.certs) != 0 {
		t.Error("WithCertificates modified its receiver")
	}
}

func FuzzParsePolicy(f *testing.F) {
	f.Add([]byte(examplePolicy))
	f.Add([]byte(testPolicyYAML))
	f.Add([]byte(fuzzPolicyYAML))
	f.Add([]byte("rules: [{name: a, identities: [x.example], keys: [\"*\"], operations: [decrypt]}]"))
	f.Add([]byte("deny: [x.example, \"*\"]\nrules: [{name: a, identities: [x.example, y.example], keys: [\"*\"], operations: [decrypt]}]"))
	f.Add([]byte("rules: []"))
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := ParsePolicy("fuzz.yaml", data)
		if err != nil {
			var perr *PolicyError
			if !errors.As(err, &perr) || !strings.HasPrefix(err.Error(), "signer: policy fuzz.yaml: ") {
				t.Fatalf("ParsePolicy() = %#v, want a *PolicyError", err)
			}
			return
		}
		if len(p.rules) == 0 && len(p.listed) != 0 {
			t.Fatalf("ParsePolicy() accepted a policy with identities but no rules: %v", p)
		}
		for _, r := range p.rules {
			if r.name == "" || len(r.identities) == 0 || len(r.keys) == 0 || (!r.sign && !r.decrypt) || (r.sign && len(r.schemes) == 0) {
				t.Fatalf("ParsePolicy() accepted an incomplete rule %+v", r)
			}
		}
		// Identify admits exactly the listed identities the deny list
		// does not name.
		for id := range p.listed {
			got, ok := p.Identify([]string{"unlisted.invalid", id})
			if denied := p.denyAll || p.deny[id]; ok == denied || (ok && got != id) {
				t.Fatalf("Identify(%q) = %q, %t; deny list %v, all %t", id, got, ok, p.deny, p.denyAll)
			}
		}
		for id := range p.deny {
			if got, ok := p.Identify([]string{id}); ok {
				t.Fatalf("Identify(%q) = %q, true, but the deny list names it", id, got)
			}
		}
		_ = p.Lint(nil)
	})
}
