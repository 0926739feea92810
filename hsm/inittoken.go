package hsm

import (
	"errors"
	"fmt"

	"github.com/miekg/pkcs11"
)

// InitToken initialises the first uninitialised token of a PKCS #11 module
// (on SoftHSM, its free slot) with a label, a security officer PIN and a user
// PIN, as `softhsm2-util --init-token --free` does, but without putting the
// PINs on a command line. It fails if a token with that label exists.
// Errors never contain a PIN.
func InitToken(modulePath, label, soPIN, userPIN string) error {
	switch {
	case modulePath == "":
		return errors.New("hsm: init token: module path is empty")
	case label == "" || len(label) > 32:
		return fmt.Errorf("hsm: init token: label %q must be 1 to 32 bytes", label)
	case len(soPIN) < 4 || len(userPIN) < 4:
		return errors.New("hsm: init token: PINs must be at least 4 characters")
	}
	p := pkcs11.New(modulePath)
	if p == nil {
		return fmt.Errorf("hsm: init token: cannot load PKCS #11 module %s", modulePath)
	}
	defer p.Destroy()
	if err := p.Initialize(); err != nil {
		if !errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
			return fmt.Errorf("hsm: init token: C_Initialize: %w", err)
		}
	} else {
		defer p.Finalize()
	}
	slots, err := p.GetSlotList(true)
	if err != nil {
		return fmt.Errorf("hsm: init token: C_GetSlotList: %w", err)
	}
	free := -1
	for _, s := range slots {
		ti, err := p.GetTokenInfo(s)
		if err != nil {
			return fmt.Errorf("hsm: init token: C_GetTokenInfo(slot %d): %w", s, err)
		}
		if ti.Flags&pkcs11.CKF_TOKEN_INITIALIZED != 0 {
			if ti.Label == label {
				return fmt.Errorf("hsm: init token: a token labelled %q exists already (slot %d)", label, s)
			}
			continue
		}
		if free < 0 {
			free = int(s)
		}
	}
	if free < 0 {
		return errors.New("hsm: init token: the module has no uninitialised token")
	}
	slot := uint(free)
	if err := p.InitToken(slot, soPIN, label); err != nil {
		return fmt.Errorf("hsm: init token: C_InitToken(slot %d): %w", slot, err)
	}
	// SoftHSM gives the new token a new slot id: find it by label.
	slots, err = p.GetSlotList(true)
	if err != nil {
		return fmt.Errorf("hsm: init token: C_GetSlotList: %w", err)
	}
	for _, s := range slots {
		if ti, err := p.GetTokenInfo(s); err == nil && ti.Label == label {
			slot = s
			break
		}
	}
	sh, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return fmt.Errorf("hsm: init token: C_OpenSession: %w", err)
	}
	defer p.CloseSession(sh)
	if err := p.Login(sh, pkcs11.CKU_SO, soPIN); err != nil {
		return fmt.Errorf("hsm: init token: log in as security officer: %w", err)
	}
	defer p.Logout(sh)
	if err := p.InitPIN(sh, userPIN); err != nil {
		return fmt.Errorf("hsm: init token: C_InitPIN: %w", err)
	}
	return nil
}
