package main

import (
	"bufio"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/big"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/keyless-tls/keyless/hsm"
	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
	"github.com/keyless-tls/keyless/signer"
)

// keys runs "keyserver keys <command>".
func keys(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return fmt.Errorf("keys: no command given (generate, list, delete, export, csr, selfsign)")
	}
	cmds := map[string]func(context.Context, *keysCmd) error{
		"generate": keysGenerate,
		"list":     keysList,
		"delete":   keysDelete,
		"export":   keysExport,
		"csr":      keysCSR,
		"selfsign": keysSelfsign,
	}
	fn, ok := cmds[args[0]]
	if !ok {
		fmt.Fprint(stderr, usage)
		return fmt.Errorf("keys: unknown command %q", args[0])
	}
	c := &keysCmd{name: args[0], stdout: stdout, stderr: stderr}
	if err := c.parse(args[1:]); err != nil {
		return err
	}
	if err := fn(ctx, c); err != nil {
		return fmt.Errorf("keys %s: %w", c.name, err)
	}
	return nil
}

// keysCmd holds the flags of every "keys" command; each uses the ones that
// apply to it.
type keysCmd struct {
	name           string
	stdout, stderr io.Writer
	hsm            hsmFlags

	// generate
	keyType string
	bits    int
	curve   string
	label   string
	id      string

	// export, csr, selfsign, delete
	key     string
	keyURI  *hsm.URI // -key as a PKCS #11 URI, or nil
	out     string
	subject string
	dns     string
	days    int
	yes     bool // delete without asking
}

// confirmInput is where "keys delete" reads its confirmation; tests
// replace it.
var confirmInput io.Reader = os.Stdin

func (c *keysCmd) parse(args []string) error {
	fs := flag.NewFlagSet("keyserver keys "+c.name, flag.ContinueOnError)
	fs.SetOutput(c.stderr)
	c.hsm.register(fs)
	switch c.name {
	case "generate":
		fs.StringVar(&c.keyType, "type", "ecdsa", "key type: rsa, ecdsa or ed25519")
		fs.IntVar(&c.bits, "bits", 0, "RSA modulus size: 2048 (if unset), 3072 or 4096")
		fs.StringVar(&c.curve, "curve", "", "ECDSA curve: P-256 (if unset) or P-384")
		fs.StringVar(&c.label, "label", "", "CKA_LABEL of the new key (required)")
		fs.StringVar(&c.id, "id", "", "CKA_ID of the new key, in hex (default: random)")
	case "export", "csr", "selfsign", "delete":
		fs.StringVar(&c.key, "key", "", "the key: its key id (hex), its label, or a PKCS #11 URI such as 'pkcs11:object=www.example.com;id=%01%02' (which may also name the token, module and pin-source); required unless -token-uri selects one key")
		if c.name == "delete" {
			fs.BoolVar(&c.yes, "yes", false, "delete without asking for confirmation")
			break
		}
		fs.StringVar(&c.out, "out", "", `output file; "-" or none is standard output`)
		if c.name != "export" {
			fs.StringVar(&c.subject, "cn", "", "subject common name (default: the first -dns name)")
			fs.StringVar(&c.dns, "dns", "", "comma-separated DNS names for the subjectAltName (required)")
		}
		if c.name == "selfsign" {
			fs.IntVar(&c.days, "days", 365, "validity in days")
		}
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("keys %s: unexpected arguments %q", c.name, fs.Args())
	}
	if err := c.parseKeyURI(); err != nil {
		return fmt.Errorf("keys %s: %w", c.name, err)
	}
	if err := c.hsm.resolveURI(fs); err != nil {
		return fmt.Errorf("keys %s: %w", c.name, err)
	}
	return nil
}

// parseKeyURI handles a -key given as a PKCS #11 URI: it must name a key
// (object= or id=), and if it also names the token, module or PIN source
// it stands in for -token-uri, which must then be unset.
func (c *keysCmd) parseKeyURI() error {
	if len(c.key) < len("pkcs11:") || !strings.EqualFold(c.key[:len("pkcs11:")], "pkcs11:") {
		return nil
	}
	u, err := hsm.ParseURI(c.key)
	if err != nil {
		return fmt.Errorf("-key: %w", err)
	}
	if !u.SelectsKeys() {
		return fmt.Errorf("-key %s names no key: add object= (the label) or id= (the CKA_ID)", u)
	}
	if u.SelectsToken() || u.ModulePath != "" || u.PINSource != "" {
		if c.hsm.tokenURI != "" {
			return errors.New("-key and -token-uri both name the token, module or PIN: name them in one place")
		}
		c.hsm.tokenURI, c.hsm.uriFlag = c.key, "-key"
	}
	c.keyURI = u
	return nil
}

// open opens the HSM named by the flags. Log lines go to stderr, at warn
// level, so that stdout holds only the command's output. With all set the
// module also has the keys that serve would skip as extractable or not
// sensitive, so that list shows them and delete can remove them.
func (c *keysCmd) open(all bool) (*hsm.Module, error) {
	logger := hclog.New(&hclog.LoggerOptions{Name: "keyserver", Level: hclog.Warn, Output: c.stderr})
	cfg, err := c.hsm.config(logger)
	if err != nil {
		return nil, err
	}
	cfg.AllowExtractable = all
	return hsm.Open(cfg)
}

// specFlags names the flag of each hsm.KeySpec field.
var specFlags = map[string]string{"Type": "-type", "Bits": "-bits", "Curve": "-curve", "Label": "-label", "ID": "-id"}

func keysGenerate(ctx context.Context, c *keysCmd) error {
	spec := hsm.KeySpec{Type: c.keyType, Bits: c.bits, Curve: c.curve, Label: c.label}
	// -token-uri's object= and id= are the defaults of -label and -id.
	if u := c.hsm.uri; u != nil && u.SelectsKeys() {
		switch {
		case u.ObjectLabel != "" && c.label != "" && c.label != u.ObjectLabel:
			return fmt.Errorf("-label %q and -token-uri's object=%s differ: use one of them", c.label, u.ObjectLabel)
		case u.ObjectID != nil && c.id != "":
			return errors.New("-id and -token-uri's id= are both set: use one of them")
		}
		if u.ObjectLabel != "" {
			spec.Label = u.ObjectLabel
		}
		spec.ID = u.ObjectID
	}
	if c.id != "" {
		id, err := hex.DecodeString(c.id)
		if err != nil {
			return fmt.Errorf("-id %q is not hex", c.id)
		}
		spec.ID = id
	}
	if err := spec.Validate(); err != nil {
		var se *hsm.SpecError
		if errors.As(err, &se) {
			return fmt.Errorf("%s %s", specFlags[se.Field], se.Reason)
		}
		return err
	}
	m, err := c.open(false)
	if err != nil {
		return err
	}
	defer m.Close()
	key, err := m.Generate(ctx, spec)
	if err != nil {
		return err
	}
	return printKeys(c.stdout, []crypto.Signer{key})
}

func keysList(ctx context.Context, c *keysCmd) error {
	m, err := c.open(true)
	if err != nil {
		return err
	}
	defer m.Close()
	// With -token-uri naming keys, only those are listed.
	keys, err := newKeyStore(m, c.hsm.uri).Keys(ctx)
	if err != nil {
		return err
	}
	return printKeys(c.stdout, keys)
}

// printKeys writes one line per key: key id, type and size, label, CKA_ID,
// what the token says of it (CKA_SENSITIVE, CKA_EXTRACTABLE,
// CKA_ALLOWED_MECHANISMS), and what the keyserver does with it: whether
// serve serves it (extractable or not sensitive keys only with
// -allow-extractable), how it decrypts premaster secrets, and the
// signature schemes it signs with, by the names a policy uses.
func printKeys(w io.Writer, keys []crypto.Signer) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "KEY ID\tTYPE\tLABEL\tCKA_ID\tSENSITIVE\tEXTRACTABLE\tALLOWED MECHANISMS\tSERVED\tDECRYPT\tSIGN")
	yesNo := map[bool]string{true: "yes", false: "no"}
	for _, k := range keys {
		d, err := signer.Describe(k)
		if err != nil {
			return err
		}
		var schemes []string
		for _, s := range signer.Schemes(k) {
			schemes = append(schemes, signer.SchemeName(keylessv1.SignatureAlgorithm(s)))
		}
		sign := strings.Join(schemes, ",")
		if sign == "" {
			sign = "none"
		}
		decrypt := "no"
		if dm, ok := k.(interface{ DecryptMechanism() string }); ok {
			decrypt = dm.DecryptMechanism()
		}
		sensitive, extractable, allowed := "?", "?", "?"
		served := "yes"
		if a, ok := k.(interface{ Attributes() hsm.KeyAttributes }); ok {
			attrs := a.Attributes()
			sensitive, extractable = yesNo[attrs.Sensitive], yesNo[attrs.Extractable]
			allowed = "any"
			if attrs.AllowedMechanisms != nil {
				allowed = strings.Join(attrs.AllowedMechanisms, ",")
			}
			if attrs.Extractable || !attrs.Sensitive {
				served = "only with -allow-extractable"
			}
		}
		typ := strings.TrimPrefix(d.GetType().String(), "KEY_TYPE_")
		fmt.Fprintf(tw, "%x\t%s-%d\t%s\t%x\t%s\t%s\t%s\t%s\t%s\t%s\n", d.GetKeyId(), typ, d.GetBits(),
			d.GetLabel(), d.GetObjectId(), sensitive, extractable, allowed, served, decrypt, sign)
	}
	return tw.Flush()
}

// keysDelete destroys the key named by -key in the token, after asking
// for confirmation on the standard input unless -yes is set.
func keysDelete(ctx context.Context, c *keysCmd) error {
	m, err := c.open(true)
	if err != nil {
		return err
	}
	defer m.Close()
	key, err := c.find(ctx, m)
	if err != nil {
		return err
	}
	d, err := signer.Describe(key)
	if err != nil {
		return err
	}
	what := fmt.Sprintf("key %x (label %q, CKA_ID %x)", d.GetKeyId(), d.GetLabel(), d.GetObjectId())
	if !c.yes {
		fmt.Fprintf(c.stderr, "Delete %s from the token? This destroys the private key and cannot be undone.\nType yes to delete it: ", what)
		answer, _ := bufio.NewReader(confirmInput).ReadString('\n')
		if strings.TrimSpace(answer) != "yes" {
			return fmt.Errorf("%s was not deleted: not confirmed (type yes, or use -yes)", what)
		}
	}
	if err := m.Delete(ctx, key); err != nil {
		return err
	}
	fmt.Fprintf(c.stdout, "deleted %s\n", what)
	return nil
}

// find returns the key named by -key: a key id in hex, a label or a
// PKCS #11 URI; without -key, the one key -token-uri selects.
func (c *keysCmd) find(ctx context.Context, m *hsm.Module) (crypto.Signer, error) {
	uri := c.keyURI
	if c.key == "" && c.hsm.uri != nil && c.hsm.uri.SelectsKeys() {
		uri = c.hsm.uri
	}
	if uri != nil {
		keys, err := newKeyStore(m, uri).Keys(ctx)
		if err != nil {
			return nil, err
		}
		switch len(keys) {
		case 0:
			return nil, fmt.Errorf("no key matches %s (see keyserver keys list)", uri)
		case 1:
			return keys[0], nil
		}
		return nil, fmt.Errorf("%d keys match %s: add id= to name one", len(keys), uri)
	}
	if c.key == "" {
		return nil, fmt.Errorf("-key is required (a key id, a label or a PKCS #11 URI)")
	}
	if id, err := link.ParseKeyID(c.key); err == nil {
		key, err := m.Key(ctx, id)
		if err != nil {
			return nil, err
		}
		if key != nil {
			return key, nil
		}
	}
	keys, err := m.Keys(ctx)
	if err != nil {
		return nil, err
	}
	var found []crypto.Signer
	for _, k := range keys {
		if d, ok := k.(signer.Describer); ok && d.Label() == c.key {
			found = append(found, k)
		}
	}
	switch len(found) {
	case 0:
		return nil, fmt.Errorf("no key has id or label %q (see keyserver keys list)", c.key)
	case 1:
		return found[0], nil
	}
	return nil, fmt.Errorf("%d keys have label %q: name the key by its key id", len(found), c.key)
}

func keysExport(ctx context.Context, c *keysCmd) error {
	return c.withKey(ctx, func(key crypto.Signer) error {
		der, err := x509.MarshalPKIXPublicKey(key.Public())
		if err != nil {
			return err
		}
		return c.writePEM("PUBLIC KEY", der)
	})
}

// withKey opens the HSM, finds the key named by -key, calls fn with it and
// closes the HSM.
func (c *keysCmd) withKey(ctx context.Context, fn func(crypto.Signer) error) error {
	m, err := c.open(false)
	if err != nil {
		return err
	}
	defer m.Close()
	key, err := c.find(ctx, m)
	if err != nil {
		return err
	}
	return fn(key)
}

func (c *keysCmd) names() (cn string, dns []string, err error) {
	for _, n := range strings.Split(c.dns, ",") {
		if n = strings.TrimSpace(n); n != "" {
			dns = append(dns, n)
		}
	}
	if len(dns) == 0 {
		return "", nil, fmt.Errorf("-dns is required")
	}
	cn = c.subject
	if cn == "" {
		cn = dns[0]
	}
	return cn, dns, nil
}

func keysCSR(ctx context.Context, c *keysCmd) error {
	cn, dns, err := c.names()
	if err != nil {
		return err
	}
	return c.withKey(ctx, func(key crypto.Signer) error {
		tmpl := &x509.CertificateRequest{Subject: pkix.Name{CommonName: cn}, DNSNames: dns}
		der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
		if err != nil {
			return err
		}
		return c.writePEM("CERTIFICATE REQUEST", der)
	})
}

func keysSelfsign(ctx context.Context, c *keysCmd) error {
	cn, dns, err := c.names()
	if err != nil {
		return err
	}
	if c.days < 1 {
		return fmt.Errorf("-days is %d; it must be at least 1", c.days)
	}
	return c.withKey(ctx, func(key crypto.Signer) error {
		serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
		if err != nil {
			return err
		}
		now := time.Now()
		tmpl := &x509.Certificate{
			SerialNumber:          serial,
			Subject:               pkix.Name{CommonName: cn},
			DNSNames:              dns,
			NotBefore:             now.Add(-time.Hour),
			NotAfter:              now.AddDate(0, 0, c.days),
			KeyUsage:              x509.KeyUsageDigitalSignature,
			ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
			BasicConstraintsValid: true,
		}
		if link.KeyTypeOf(key.Public()) == keylessv1.KeyType_KEY_TYPE_RSA {
			tmpl.KeyUsage |= x509.KeyUsageKeyEncipherment
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
		if err != nil {
			return err
		}
		return c.writePEM("CERTIFICATE", der)
	})
}

// writePEM writes one PEM block to -out, or to stdout when -out is "" or
// "-".
func (c *keysCmd) writePEM(typ string, der []byte) error {
	b := pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
	if c.out == "" || c.out == "-" {
		_, err := c.stdout.Write(b)
		return err
	}
	return os.WriteFile(c.out, b, 0o644)
}
