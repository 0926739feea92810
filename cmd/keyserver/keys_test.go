package main

import (
	"fmt"
	"strings"
	"testing"

	"github.com/keyless-tls/keyless/hsm/hsmtest"
)

// listLine returns the line of keys list's output for the key labelled
// label, split into its columns, or nil.
func listLine(out, label string) []string {
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) > 2 && f[2] == label {
			return f
		}
	}
	return nil
}

// TestKeysListAttributes checks what keys list says of each key: the
// token's attributes, whether serve serves it, how it decrypts and the
// schemes it signs with, by their policy names.
func TestKeysListAttributes(t *testing.T) {
	tok := hsmtest.New(t)
	flags := tokenFlags(t, tok)
	tok.PKCS11Tool(t, "--keypairgen", "--key-type", "rsa:2048", "--label", "pkcs-only", "--id", "01", "--allowed-mechanisms", "RSA-PKCS")
	tok.PKCS11Tool(t, "--keypairgen", "--key-type", "EC:prime256v1", "--label", "copyable", "--id", "02", "--extractable")
	if _, errs, err := runCmd(t, append([]string{"keys", "generate", "-type", "rsa", "-label", "gen-rsa", "-id", "03"}, flags...)...); err != nil {
		t.Fatalf("keys generate: %v\n%s", err, errs)
	}
	out, errs, err := runCmd(t, append([]string{"keys", "list"}, flags...)...)
	if err != nil {
		t.Fatalf("keys list: %v\n%s", err, errs)
	}
	header := strings.Split(out, "\n")[0]
	for _, col := range []string{"SENSITIVE", "EXTRACTABLE", "ALLOWED MECHANISMS", "SERVED", "DECRYPT", "SIGN"} {
		if !strings.Contains(header, col) {
			t.Errorf("keys list's header %q lacks %s", header, col)
		}
	}
	for _, tt := range []struct {
		label string
		want  []string // columns from TYPE on
	}{
		{"gen-rsa", []string{"RSA-2048", "gen-rsa", "03", "yes", "no", "any", "yes", "CKM_RSA_X_509",
			"rsa_pss_rsae_sha256,rsa_pss_rsae_sha384,rsa_pss_rsae_sha512,rsa_pkcs1_sha256,rsa_pkcs1_sha384,rsa_pkcs1_sha512"}},
		{"pkcs-only", []string{"RSA-2048", "pkcs-only", "01", "yes", "no", "CKM_RSA_PKCS", "yes", "CKM_RSA_PKCS",
			"rsa_pkcs1_sha256,rsa_pkcs1_sha384,rsa_pkcs1_sha512"}},
		{"copyable", []string{"ECDSA-256", "copyable", "02", "yes", "yes", "any", "only", "with", "-allow-extractable", "no",
			"ecdsa_sha256,ecdsa_sha384,ecdsa_sha512"}},
	} {
		got := listLine(out, tt.label)
		if got == nil || fmt.Sprint(got[1:]) != fmt.Sprint(tt.want) {
			t.Errorf("keys list for %q = %q, want %q\n%s", tt.label, got, tt.want, out)
		}
	}
}

func TestKeysDelete(t *testing.T) {
	tok := hsmtest.New(t)
	flags := tokenFlags(t, tok)
	keys := func(args ...string) (string, error) {
		t.Helper()
		out, _, err := runCmd(t, append(append([]string{"keys"}, args...), flags...)...)
		return out, err
	}
	for _, label := range []string{"a", "b", "c", "d"} {
		if _, err := keys("generate", "-type", "ecdsa", "-label", label); err != nil {
			t.Fatal(err)
		}
	}
	tok.PKCS11Tool(t, "--keypairgen", "--key-type", "EC:prime256v1", "--label", "e", "--id", "0e", "--extractable")
	listed := func(label string) bool {
		t.Helper()
		out, err := keys("list")
		if err != nil {
			t.Fatal(err)
		}
		return listLine(out, label) != nil
	}
	confirm := func(answer string) {
		old := confirmInput
		confirmInput = strings.NewReader(answer)
		t.Cleanup(func() { confirmInput = old })
	}

	// Not confirmed: nothing happens.
	for _, answer := range []string{"no\n", "\n", "", "y\n"} {
		confirm(answer)
		if _, err := keys("delete", "-key", "a"); err == nil || !strings.Contains(err.Error(), "was not deleted: not confirmed") {
			t.Errorf("delete answered %q = %v, want not confirmed", answer, err)
		}
	}
	if !listed("a") {
		t.Fatal("an unconfirmed delete deleted the key")
	}

	idOf := func(label string) string {
		out, _ := keys("list")
		return listLine(out, label)[0]
	}
	for _, tt := range []struct {
		name, label string
		args        []string
		answer      string
	}{
		{"by label, confirmed", "a", []string{"-key", "a"}, "yes\n"},
		{"by key id, -yes", "b", []string{"-key", idOf("b"), "-yes"}, ""},
		{"by URI, -yes", "c", []string{"-key", "pkcs11:object=c", "-yes"}, ""},
		{"an extractable key", "e", []string{"-key", "pkcs11:id=%0e", "-yes"}, ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			confirm(tt.answer)
			out, stderr, err := runCmd(t, append(append([]string{"keys", "delete"}, tt.args...), flags...)...)
			if err != nil {
				t.Fatalf("keys delete %q: %v\n%s", tt.args, err, stderr)
			}
			if !strings.HasPrefix(out, "deleted key ") || !strings.Contains(out, fmt.Sprintf("label %q", tt.label)) {
				t.Errorf("keys delete printed %q", out)
			}
			if prompted := strings.Contains(stderr, "Type yes to delete it"); prompted != (tt.answer != "") {
				t.Errorf("prompted: %t, want %t", prompted, tt.answer != "")
			}
			if listed(tt.label) {
				t.Errorf("key %q is still listed", tt.label)
			}
			if list := tok.PKCS11Tool(t, "--list-objects"); strings.Contains(list, "label:      "+tt.label+"\n") {
				t.Errorf("an object labelled %q is still on the token:\n%s", tt.label, list)
			}
		})
	}
	if !listed("d") {
		t.Error("the key that was not named was deleted too")
	}
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"-key", "a", "-yes"}, `no key has id or label "a"`},
		{[]string{"-yes"}, "-key is required"},
		{[]string{"-key", "pkcs11:object=nope", "-yes"}, "no key matches"},
	} {
		if _, err := keys(append([]string{"delete"}, tt.args...)...); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("keys delete %q = %v, want an error containing %q", tt.args, err, tt.want)
		}
	}
}
