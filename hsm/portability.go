package hsm

import (
	"path/filepath"
	"strings"

	"github.com/miekg/pkcs11"
)

// initHint adds to a failed C_Initialize what it means on PKCS #11
// libraries known to answer misleadingly: openCryptoki answers
// CKR_HOST_MEMORY when its slot daemon, pkcsslotd, is not running.
func initHint(path string, err error) string {
	if isCode(err, pkcs11.CKR_HOST_MEMORY) && strings.Contains(filepath.Base(path), "opencryptoki") {
		return " (openCryptoki answers so when its slot daemon is not running: start pkcsslotd as root)"
	}
	return ""
}
