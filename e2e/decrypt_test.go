package e2e

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/hex"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// TestDecryptThroughAPI sends premaster ciphertexts of every kind straight
// to the keyserver's gRPC API (mutual TLS, the policy, the audit trail, a
// SoftHSM key) and checks implicit rejection as an edge sees it: a valid
// ciphertext yields exactly its premaster; every defective one yields 48
// bytes and OK, the same bytes each time as a valid one does (so that
// asking twice tells nothing), other bytes for each; and the keyserver's
// log lines do not tell them apart, nor contain any ciphertext or
// premaster.
func TestDecryptThroughAPI(t *testing.T) {
	c := sharedChain(t)
	clientTLS, err := link.ClientMTLSConfig(c.link.edgeCert, c.link.edgeKey, c.link.caFile, c.link.serverName)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient("passthrough:///"+c.ksAddr, grpc.WithTransportCredentials(credentials.NewTLS(clientTLS)))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := keylessv1.NewKeylessServiceClient(conn)
	pub := c.rsaPub
	id, _ := link.KeyIDOf(pub)

	premaster := make([]byte, 48)
	rand.Read(premaster)
	valid, err := rsa.EncryptPKCS1v15(rand.Reader, pub, premaster)
	if err != nil {
		t.Fatal(err)
	}
	payload := func(n int) []byte { b := make([]byte, n); rand.Read(b); return b }
	defective := []struct {
		name string
		ct   []byte
	}{
		{"bad block type", rawRSAEncrypt(pub, pkcs1Block(pub, payload(48), 1))},
		{"47-byte premaster", rawRSAEncrypt(pub, pkcs1Block(pub, payload(47), 2))},
		{"49-byte premaster", rawRSAEncrypt(pub, pkcs1Block(pub, payload(49), 2))},
		{"ciphertext = modulus", pub.N.FillBytes(make([]byte, pub.Size()))},
		{"ciphertext all ones", bytes.Repeat([]byte{0xff}, pub.Size())},
		{"short", valid[:len(valid)-1]},
		{"long", append(append([]byte{}, valid...), 0)},
		{"empty", nil},
		{"oversize", payload(4096)},
	}
	decrypt := func(ct []byte) []byte {
		t.Helper()
		resp, err := client.Decrypt(t.Context(), &keylessv1.DecryptRequest{KeyId: id[:], EncryptedPremaster: ct,
			Context: &keylessv1.RequestContext{ServerName: nameRSA}})
		if err != nil {
			t.Fatalf("Decrypt() = %v, want OK whatever the ciphertext", err)
		}
		if n := len(resp.GetPremaster()); n != 48 {
			t.Fatalf("Decrypt() returned %d bytes, want 48", n)
		}
		return resp.GetPremaster()
	}

	logStart := len(c.logs.String())
	if got := decrypt(valid); !bytes.Equal(got, premaster) {
		t.Errorf("Decrypt(valid) = %x, want the premaster %x", got, premaster)
	}
	validLog := c.logs.String()[logStart:]
	var secrets [][]byte
	secrets = append(secrets, premaster, valid)
	seen := map[string]bool{}
	for _, tt := range defective {
		t.Run(tt.name, func(t *testing.T) {
			start := len(c.logs.String())
			a, b := decrypt(tt.ct), decrypt(tt.ct)
			if !bytes.Equal(a, b) {
				t.Errorf("two decryptions of the same defective ciphertext gave %x and %x; want the same bytes, as for a valid one", a, b)
			}
			if bytes.Equal(a, premaster) {
				t.Errorf("a defective ciphertext decrypted to the valid premaster")
			}
			if seen[string(a)] {
				t.Errorf("two defective ciphertexts were answered with the same bytes %x", a)
			}
			seen[string(a)] = true
			if logged := c.logs.String()[start:]; logged != strings.Repeat(validLog, 2) {
				t.Errorf("the keyserver logged differently than for a valid ciphertext:\n%q\nvs\n%q", logged, validLog)
			}
			secrets = append(secrets, a, b)
			if len(tt.ct) >= 8 {
				secrets = append(secrets, tt.ct)
			}
		})
	}
	all := c.logs.String() + c.auditLogs.String()
	for _, s := range secrets {
		for _, enc := range []string{hex.EncodeToString(s), base64.StdEncoding.EncodeToString(s), string(s)} {
			if strings.Contains(all, enc) {
				t.Fatalf("a ciphertext or premaster appears in the keyserver's logs or audit trail")
			}
		}
	}
}
