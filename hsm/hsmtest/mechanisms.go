package hsmtest

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

// NoRawRSAMechanisms is the softhsm2.conf setting that takes raw RSA
// (CKM_RSA_X_509) away from every slot, as FIPS-mode HSMs do. SoftHSM
// 2.6.1 ignores the first name of a "-" list, so the name is given twice.
const NoRawRSAMechanisms = "-CKM_RSA_X_509,CKM_RSA_X_509"

var noRaw struct {
	once sync.Once
	path string
	err  error
}

// NoRawRSAConf returns a softhsm2.conf, written once per test binary, for
// the same token directory as the tokens [New] makes, in which SoftHSM
// offers no CKM_RSA_X_509 ([NoRawRSAMechanisms]). SoftHSM reads
// SOFTHSM2_CONF once per process, so the file is for other processes (a
// keyserver, pkcs11-tool) run with SOFTHSM2_CONF set to it: they see this
// binary's tokens, without raw RSA. It skips or fails as New does.
func NoRawRSAConf(t testing.TB) string {
	t.Helper()
	requireModule(t)
	setupOnce.Do(func() { setupErr = setup() })
	if setupErr != nil {
		t.Fatalf("hsmtest: %v", setupErr)
	}
	noRaw.once.Do(func() {
		noRaw.path = filepath.Join(confDir, "softhsm2-no-raw-rsa.conf")
		body := fmt.Sprintf("directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\nslots.mechanisms = %s\n",
			Dir(), NoRawRSAMechanisms)
		noRaw.err = os.WriteFile(noRaw.path, []byte(body), 0o600)
	})
	if noRaw.err != nil {
		t.Fatalf("hsmtest: %v", noRaw.err)
	}
	return noRaw.path
}
