package signer

import (
	"crypto/x509"
	"errors"
	"slices"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

func TestParsePolicyDeny(t *testing.T) {
	p := mustPolicy(t, `
deny: [Edge-3.Example.COM., group:lost]
groups:
  lost: [spiffe://example.com/edge/lost]
rules:
  - name: all
    identities: [edge-1.example.com, edge-3.example.com, spiffe://example.com/edge/lost]
    keys: ["*"]
    operations: [sign]
    schemes: [default]
`)
	if !p.deny["edge-3.example.com"] || !p.deny["spiffe://example.com/edge/lost"] || len(p.deny) != 2 || p.denyAll || p.denyLine != 2 {
		t.Errorf("deny = %v, all %t, line %d", p.deny, p.denyAll, p.denyLine)
	}
	if got := strings.Join(p.Identities(), " "); got != "edge-1.example.com" {
		t.Errorf("Identities() = %q, want the listed identities less the denied ones", got)
	}
	if got := p.String(); !strings.HasSuffix(got, ", deny: 2 identities") {
		t.Errorf("String() = %q", got)
	}
	if got := strings.Join(p.Lint(nil), "\n"); !strings.Contains(got, "line 2: deny: these identities are denied whatever the rules say: edge-3.example.com, spiffe://example.com/edge/lost") {
		t.Errorf("Lint() =\n%s\nwant the deny list named", got)
	}
	if slices.Contains(p.unusedGroups, "lost") {
		t.Error("a group named only by the deny list is reported unused")
	}

	all := mustPolicy(t, testPolicyYAML+"deny: [\"*\", edge-9.example.com]\n")
	if !all.denyAll || len(all.Identities()) != 0 || !strings.HasSuffix(all.String(), ", deny: every identity") {
		t.Errorf("deny [*]: all %t, Identities() %q, String() %q", all.denyAll, all.Identities(), all.String())
	}
	if got := strings.Join(all.Lint(nil), "\n"); !strings.Contains(got, `deny: "*": every identity is denied`) {
		t.Errorf("Lint() =\n%s\nwant a warning that everyone is denied", got)
	}

	// rules: [] is an explicit "deny everyone", with a warning; a missing
	// rules field stays an error.
	none := mustPolicy(t, "rules: []\n")
	if len(none.rules) != 0 || len(none.Identities()) != 0 {
		t.Errorf("rules: [] = %d rules, identities %q", len(none.rules), none.Identities())
	}
	if got := strings.Join(none.Lint(nil), "\n"); !strings.Contains(got, "rules is empty: every identity is denied") {
		t.Errorf("Lint() =\n%s\nwant a warning that everyone is denied", got)
	}
	for _, doc := range []string{"deny: [\"*\"]\n", "rules:\n", "groups:\n  g: [a.example]\n"} {
		if _, err := ParsePolicy("bad.yaml", []byte(doc)); err == nil || !strings.Contains(err.Error(), "write rules: [] to deny every identity on purpose") {
			t.Errorf("ParsePolicy(%q) = %v, want an error that says how to deny everyone", doc, err)
		}
	}

	for _, tt := range []struct{ doc, want string }{
		{testPolicyYAML + "deny: [group:nope]\n", `line 8: deny[0]: "group:nope": no such group`},
		{testPolicyYAML + "deny: [a.example, \"*.example.com\"]\n", "deny[1]: identity \"*.example.com\" has a wildcard"},
		{testPolicyYAML + "deny: [\"edge 1\"]\n", "deny[0]: identity \"edge 1\" contains white space"},
		{testPolicyYAML + "deny: edge.example\n", "cannot unmarshal"},
	} {
		_, err := ParsePolicy("bad.yaml", []byte(tt.doc))
		var perr *PolicyError
		if !errors.As(err, &perr) || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("ParsePolicy(%q) = %v, want a *PolicyError containing %q", tt.doc, err, tt.want)
		}
	}
}

func TestIdentifyDeny(t *testing.T) {
	p := mustPolicy(t, `
deny: [edge-2.example.com]
rules:
  - name: all
    identities: [spiffe://example.com/edge/1, edge-1.example.com, edge-2.example.com]
    keys: ["*"]
    operations: [sign]
    schemes: [default]
`)
	tests := []struct {
		names      []string
		want       string // the identity, if admitted
		wantRecord string // the name recorded otherwise
		reason     string
	}{
		{[]string{"spiffe://example.com/edge/1", "edge-1.example.com"}, "spiffe://example.com/edge/1", "", ""},
		{[]string{"edge-2.example.com"}, "", "edge-2.example.com", `identity "edge-2.example.com" is on the deny list of policy test.yaml (line 2)`},
		// A denied name bars the certificate, even after a listed name.
		{[]string{"spiffe://example.com/edge/1", "edge-2.example.com"}, "", "edge-2.example.com", "deny list"},
		{[]string{"stranger.example.com"}, "", "stranger.example.com", "is an identity of the policy"},
	}
	for _, tt := range tests {
		got, ok := p.Identify(tt.names)
		if got != tt.want || ok != (tt.want != "") {
			t.Errorf("Identify(%q) = %q, %t, want %q", tt.names, got, ok, tt.want)
		}
		id, ok, reason := p.admit(tt.names)
		if ok {
			continue
		}
		if id != tt.wantRecord || !strings.Contains(reason, tt.reason) {
			t.Errorf("admit(%q) = %q, %q, want %q with %q", tt.names, id, reason, tt.wantRecord, tt.reason)
		}
	}
	all := mustPolicy(t, testPolicyYAML+"deny: [\"*\"]\n")
	if id, ok, reason := all.admit([]string{testIdentity}); ok || id != testIdentity || !strings.Contains(reason, `the deny list of policy test.yaml (line 8) denies every identity ("*")`) {
		t.Errorf("admit() under deny [*] = %q, %t, %q", id, ok, reason)
	}
	none := mustPolicy(t, "rules: []\n")
	if _, ok, reason := none.admit([]string{testIdentity}); ok || !strings.Contains(reason, "has no rules, so it denies every identity") {
		t.Errorf("admit() under rules: [] = %t, %q", ok, reason)
	}
}

func TestCheckPeerDeny(t *testing.T) {
	svc, err := NewService(Config{Keys: newTestMemoryStore(t), Policy: testPolicy(t)})
	if err != nil {
		t.Fatal(err)
	}
	leaf := thePKI().issue(x509.ExtKeyUsageClientAuth, testIdentity).Leaf
	if err := svc.CheckPeer(leaf); err != nil {
		t.Fatalf("CheckPeer() = %v", err)
	}
	for _, deny := range []string{testIdentity, `"*"`} {
		if err := svc.SetPolicy(mustPolicy(t, testPolicyYAML+"deny: ["+deny+"]\n")); err != nil {
			t.Fatal(err)
		}
		err := svc.CheckPeer(leaf)
		var perr *PermissionError
		if !errors.As(err, &perr) || !strings.Contains(err.Error(), "deny list") {
			t.Errorf("CheckPeer() with deny [%s] = %v, want a *PermissionError naming the deny list", deny, err)
		}
	}
}

// TestDenyCutsOffOpenConnection: a reload whose deny list names an
// identity refuses its next request on a connection opened before, unary
// and on an open Stream alike, and records it under the denied name; other
// identities go on. deny: ["*"] then refuses everyone.
func TestDenyCutsOffOpenConnection(t *testing.T) {
	const other = "spiffe://test.example/edge/2"
	ts := newTestServer(t, Config{Keys: newTestMemoryStore(t), Policy: mustPolicy(t, strings.Replace(testPolicyYAML,
		"["+testIdentity+"]", "["+testIdentity+", "+other+"]", 1))})
	b := ts.dial(t, other)
	st := openStream(t, ts.client)
	sendOps(t, st, signOp(1, p256SignRequest(t)))
	checkP256Result(t, receiveResults(t, st, 1)[1])
	for _, c := range []struct {
		name string
		call func() error
	}{
		{"edge 1", func() error { _, err := ts.client.Sign(testContext(t, 0), p256SignRequest(t)); return err }},
		{"edge 2", func() error { _, err := b.Sign(testContext(t, 0), p256SignRequest(t)); return err }},
	} {
		if err := c.call(); err != nil {
			t.Fatalf("%s: Sign() before the reload = %v", c.name, err)
		}
	}
	newRecords := newAuditCount(t, ts)
	_ = newRecords()

	if err := ts.svc.SetPolicy(mustPolicy(t, strings.Replace(testPolicyYAML, "["+testIdentity+"]", "["+testIdentity+", "+other+"]", 1)+
		"deny: ["+testIdentity+"]\n")); err != nil {
		t.Fatal(err)
	}
	_, err := ts.client.Sign(testContext(t, 0), p256SignRequest(t))
	checkStatus(t, "unary Sign() of the denied identity", err, codes.PermissionDenied, "")
	if !strings.Contains(status.Convert(err).Message(), `identity "spiffe://test.example/edge/1" is on the deny list of policy test.yaml`) {
		t.Errorf("Sign() = %v, want the deny list named", err)
	}
	sendOps(t, st, signOp(2, p256SignRequest(t)))
	checkStatus(t, "stream Sign() of the denied identity", resultErr(receiveResults(t, st, 1)[2]), codes.PermissionDenied, "")
	if _, err := ts.client.ListKeys(testContext(t, 0), nil); status.Code(err) != codes.PermissionDenied {
		t.Errorf("ListKeys() of the denied identity = %v, want PermissionDenied", err)
	}
	resp, err := b.Sign(testContext(t, 0), p256SignRequest(t))
	if err != nil {
		t.Fatalf("Sign() of another identity = %v", err)
	}
	checkP256Result(t, &keylessv1.OperationResult{Result: &keylessv1.OperationResult_Sign{Sign: resp}})
	recs := newRecords()
	if len(recs) != 4 {
		t.Fatalf("%d audit records, want 4: %+v", len(recs), recs)
	}
	for _, r := range recs[:3] {
		if r.Identity != testIdentity || r.Outcome != "PermissionDenied" || !strings.Contains(r.Error, "deny list") {
			t.Errorf("record %+v, want PermissionDenied for %s naming the deny list", r, testIdentity)
		}
	}
	if r := recs[3]; r.Identity != other || r.Outcome != "OK" {
		t.Errorf("record %+v, want OK for %s", r, other)
	}

	if err := ts.svc.SetPolicy(mustPolicy(t, testPolicyYAML+"deny: [\"*\"]\n")); err != nil {
		t.Fatal(err)
	}
	_, err = b.Sign(testContext(t, 0), p256SignRequest(t))
	checkStatus(t, "Sign() under deny [*]", err, codes.PermissionDenied, "")
	if !strings.Contains(err.Error(), "denies every identity") {
		t.Errorf("Sign() under deny [*] = %v", err)
	}

	// Lifting the deny list lets the identity back in on the same stream.
	if err := ts.svc.SetPolicy(testPolicy(t)); err != nil {
		t.Fatal(err)
	}
	sendOps(t, st, signOp(3, p256SignRequest(t)))
	checkP256Result(t, receiveResults(t, st, 1)[3])
}
