package bench

import (
	"context"
	"fmt"
	"io"

	"github.com/keyless-tls/keyless/link"
	"github.com/keyless-tls/keyless/signer"
)

// runInproc is the "inproc" mode, the baseline of the key operations: the
// same SoftHSM key called in this process through package hsm, at the
// given concurrency, with no bound but hsm's own session pool.
func runInproc(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("inproc", stderr)
	var (
		lf loadFlags
		kf keyFlags
		hf hsmFlags
	)
	lf.register(fs)
	kf.register(fs)
	hf.register(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	id, ins, err := kf.inputs(lf.concurrency)
	if err != nil {
		return err
	}
	m, err := hf.open()
	if err != nil {
		return err
	}
	defer m.Close()
	key, err := m.Key(ctx, id)
	if err != nil {
		return err
	}
	if key == nil {
		return fmt.Errorf("bench: key %s is not on token %q", link.FormatKeyID(id), hf.label)
	}
	var op Op
	switch kf.op {
	case OpRSADecrypt:
		d, ok := key.(signer.PremasterDecrypter)
		if !ok {
			return fmt.Errorf("bench: key %s cannot decrypt", link.FormatKeyID(id))
		}
		op = func(ctx context.Context, w int) error {
			_, err := d.DecryptPremaster(ctx, ins[w].ciphertext)
			return err
		}
	default:
		cs, ok := key.(signer.ContextSigner)
		if !ok {
			return fmt.Errorf("bench: key %s has no SignContext", link.FormatKeyID(id))
		}
		op = func(ctx context.Context, w int) error {
			_, err := cs.SignContext(ctx, ins[w].digest, ins[w].alg.SignerOpts())
			return err
		}
	}
	return lf.run(ctx, stdout, "inproc/"+kf.op, "inproc", op)
}
