package hsm

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/hashicorp/go-hclog"
	"github.com/miekg/pkcs11"
)

// Defaults for the zero values of [Config] fields.
const (
	// DefaultMaxSessions is the session cap used when Config.MaxSessions
	// is 0.
	DefaultMaxSessions = 8
	// DefaultPoolWaitTimeout bounds the wait for a free session when
	// Config.PoolWaitTimeout is 0.
	DefaultPoolWaitTimeout = 5 * time.Second
	// DefaultSignTimeout bounds the Sign method of the keys, which has no
	// context. SignContext is bounded by its context alone.
	DefaultSignTimeout = 30 * time.Second
	// DefaultRescanInterval is how often the token is scanned for added
	// and removed keys when Config.RescanInterval is 0.
	DefaultRescanInterval = 30 * time.Second
	// DefaultMaxReconnectBackoff caps the wait between two attempts to
	// reconnect to a faulty token when Config.MaxReconnectBackoff is 0.
	DefaultMaxReconnectBackoff = 5 * time.Second
	// DefaultStuckCallThreshold is how long a PKCS #11 call may run
	// before it is reported as stuck when Config.StuckCallThreshold is 0.
	DefaultStuckCallThreshold = 10 * time.Second
)

// minReconnectBackoff is the wait after the first failed attempt to
// reconnect; it doubles with each further failure.
const minReconnectBackoff = 100 * time.Millisecond

// tokenPollInterval caps the wait between attempts to reconnect while the
// token is absent (the library lists no such token or does not answer),
// which cost the token nothing.
const tokenPollInterval = 250 * time.Millisecond

// maxTokenLabelLen is the size of CK_TOKEN_INFO.label.
const maxTokenLabelLen = 32

// Config says which PKCS #11 token to open and how. A Config must not be
// modified after it is passed to [Open].
//
// Printing a Config with the fmt package (%v, %+v, %#v) shows "<redacted>"
// for a non-empty PIN.
type Config struct {
	// ModulePath is the file name of the PKCS #11 module (shared library),
	// such as /usr/lib/softhsm/libsofthsm2.so. Required.
	ModulePath string

	// TokenLabel, TokenSerial and SlotNumber select the token: exactly one
	// of them must be set. A label or serial number that more than one
	// present token has is an error.
	TokenLabel  string
	TokenSerial string
	SlotNumber  *int

	// TokenURI, if not nil, narrows the token further: every token, slot
	// and library attribute of the URI (token, serial, slot-id,
	// manufacturer, model, slot-description, slot-manufacturer,
	// library-manufacturer, library-description, library-version) must
	// match, so that a URI copied from `p11tool --list-privkeys` or
	// `pkcs11-tool` selects exactly the token it was copied from. Its
	// object attributes and its module and PIN are not used here.
	TokenURI *URI

	// PIN is the user (CKU_USER) PIN. Required. It is never logged and
	// never appears in an error; the caller reads it from a file or the
	// environment. The module keeps it in memory to log in sessions it
	// opens later.
	PIN string

	// MaxSessions caps the PKCS #11 sessions of each of the module's two
	// pools: crypto11's (RSA and ECDSA signing and key generation; it keeps
	// one further session for itself, so its practical minimum is 2) and the
	// module's own (premaster decryption, Ed25519, key discovery and health
	// checks), which gets MaxSessions-1. Zero means [DefaultMaxSessions]; 1
	// and negative values are errors. When the token reports a limit
	// (the lower of ulMaxSessionCount and ulMaxRwSessionCount) that the two
	// pools would exceed, MaxSessions is lowered to fit it, down to 2;
	// values of 2^32 and above are taken for no limit (openCryptoki reports
	// 0xFFFFFFFFFFFFFFFE).
	MaxSessions int

	// PoolWaitTimeout bounds the wait for a free session of either pool
	// when all are in use. Zero means [DefaultPoolWaitTimeout]; negative
	// values are errors. A context with an earlier deadline ends the wait
	// sooner.
	PoolWaitTimeout time.Duration

	// RescanInterval is how often the module scans the token for key pairs
	// while it is healthy, so that keys added or removed by other
	// applications (or other keyservers on the same token) are noticed and
	// logged. Zero means [DefaultRescanInterval]; a negative value turns
	// periodic scans off ([Module.Refresh] still scans on demand).
	RescanInterval time.Duration

	// MaxReconnectBackoff caps the wait between attempts to reconnect to a
	// token after a fault. The module tries at once, then after 100 ms,
	// doubling each time up to this cap; while the token is absent (the
	// library does not initialise, lists no such token, or does not
	// answer) it looks every 250 ms at most, so that it is back in service
	// soon after the token returns. Zero means
	// [DefaultMaxReconnectBackoff]; negative values are errors.
	MaxReconnectBackoff time.Duration

	// StuckCallThreshold is how long a PKCS #11 call of a key operation may
	// run before it is logged as stuck (once, and again when it returns).
	// While every call slot is held by a stuck call, operations fail at
	// once and [Module.Check] fails. Zero means
	// [DefaultStuckCallThreshold]; negative values are errors.
	StuckCallThreshold time.Duration

	// AllowExtractable makes the module serve private keys whose
	// CKA_EXTRACTABLE is true or whose CKA_SENSITIVE is false. By default
	// such keys are skipped, with a warning, when the token is scanned.
	AllowExtractable bool

	// Logger receives the module's startup summary and warnings, under
	// the name "hsm". Nil means no logging.
	Logger hclog.Logger
}

// Validate reports whether the configuration is complete and consistent.
// Its errors name the offending field, as in "hsm: Config.ModulePath is
// empty"; they never contain the PIN.
func (c *Config) Validate() error {
	if c.ModulePath == "" {
		return errors.New("hsm: Config.ModulePath is empty")
	}
	var set []string
	if c.TokenLabel != "" {
		set = append(set, "TokenLabel")
	}
	if c.TokenSerial != "" {
		set = append(set, "TokenSerial")
	}
	if c.SlotNumber != nil {
		set = append(set, "SlotNumber")
	}
	switch len(set) {
	case 0:
		return errors.New("hsm: Config needs exactly one of TokenLabel, TokenSerial and SlotNumber; none is set")
	case 1:
	default:
		return fmt.Errorf("hsm: Config needs exactly one of TokenLabel, TokenSerial and SlotNumber; %s are set", strings.Join(set, " and "))
	}
	switch {
	case len(c.TokenLabel) > maxTokenLabelLen:
		return fmt.Errorf("hsm: Config.TokenLabel is %d bytes; a PKCS #11 token label has at most %d", len(c.TokenLabel), maxTokenLabelLen)
	case c.SlotNumber != nil && *c.SlotNumber < 0:
		return fmt.Errorf("hsm: Config.SlotNumber is %d; it must not be negative", *c.SlotNumber)
	case c.PIN == "":
		return errors.New("hsm: Config.PIN is empty")
	case strings.IndexByte(c.PIN, 0) >= 0:
		return errors.New("hsm: Config.PIN contains a NUL byte")
	case c.MaxSessions < 0 || c.MaxSessions == 1:
		return fmt.Errorf("hsm: Config.MaxSessions is %d; it must be 0 (for %d) or at least 2, because crypto11 keeps one session for itself", c.MaxSessions, DefaultMaxSessions)
	case c.PoolWaitTimeout < 0:
		return fmt.Errorf("hsm: Config.PoolWaitTimeout is %v; it must be 0 (for %v) or positive", c.PoolWaitTimeout, DefaultPoolWaitTimeout)
	case c.MaxReconnectBackoff < 0:
		return fmt.Errorf("hsm: Config.MaxReconnectBackoff is %v; it must be 0 (for %v) or positive", c.MaxReconnectBackoff, DefaultMaxReconnectBackoff)
	case c.StuckCallThreshold < 0:
		return fmt.Errorf("hsm: Config.StuckCallThreshold is %v; it must be 0 (for %v) or positive", c.StuckCallThreshold, DefaultStuckCallThreshold)
	}
	return nil
}

// String returns the configuration with the PIN redacted.
func (c Config) String() string {
	slot := "<nil>"
	if c.SlotNumber != nil {
		slot = strconv.Itoa(*c.SlotNumber)
	}
	return fmt.Sprintf("{ModulePath:%q TokenLabel:%q TokenSerial:%q SlotNumber:%s PIN:%s MaxSessions:%d PoolWaitTimeout:%v RescanInterval:%v MaxReconnectBackoff:%v StuckCallThreshold:%v AllowExtractable:%t}",
		c.ModulePath, c.TokenLabel, c.TokenSerial, slot, redacted(c.PIN), c.MaxSessions, c.PoolWaitTimeout, c.RescanInterval, c.MaxReconnectBackoff, c.StuckCallThreshold, c.AllowExtractable)
}

// GoString is String for the %#v verb, so that no format shows the PIN.
func (c Config) GoString() string { return "hsm.Config" + c.String() }

func redacted(s string) string {
	if s == "" {
		return `""`
	}
	return "<redacted>"
}

func (c *Config) maxSessions() int {
	if c.MaxSessions == 0 {
		return DefaultMaxSessions
	}
	return c.MaxSessions
}

// sessionsFor returns the MaxSessions the module uses on a token: want,
// lowered so that crypto11's sessions (MaxSessions) and the module's own
// pool (MaxSessions-1) stay within the token's session limit, if it
// reports one, but never below 2. The second result is the token's limit,
// 0 for none.
func sessionsFor(want int, ti pkcs11.TokenInfo) (int, uint) {
	limit := uint(0)
	for _, v := range []uint{ti.MaxSessionCount, ti.MaxRwSessionCount} {
		// CK_EFFECTIVELY_INFINITE (0), CK_UNAVAILABLE_INFORMATION (all
		// ones) and absurdly large values (openCryptoki's
		// 0xFFFFFFFFFFFFFFFE) mean no limit.
		if v == pkcs11.CK_EFFECTIVELY_INFINITE || v == pkcs11.CK_UNAVAILABLE_INFORMATION || uint64(v) >= 1<<32 {
			continue
		}
		if limit == 0 || v < limit {
			limit = v
		}
	}
	if limit == 0 || uint(2*want-1) <= limit {
		return want, limit
	}
	return max(2, int((limit+1)/2)), limit
}

func (c *Config) poolWaitTimeout() time.Duration {
	if c.PoolWaitTimeout == 0 {
		return DefaultPoolWaitTimeout
	}
	return c.PoolWaitTimeout
}

// rescanInterval returns the interval of periodic scans, or 0 for none.
func (c *Config) rescanInterval() time.Duration {
	switch {
	case c.RescanInterval == 0:
		return DefaultRescanInterval
	case c.RescanInterval < 0:
		return 0
	}
	return c.RescanInterval
}

func (c *Config) maxReconnectBackoff() time.Duration {
	if c.MaxReconnectBackoff == 0 {
		return DefaultMaxReconnectBackoff
	}
	return c.MaxReconnectBackoff
}

func (c *Config) stuckCallThreshold() time.Duration {
	if c.StuckCallThreshold == 0 {
		return DefaultStuckCallThreshold
	}
	return c.StuckCallThreshold
}

// Key types for [KeySpec.Type].
const (
	KeyTypeRSA     = "rsa"
	KeyTypeECDSA   = "ecdsa"
	KeyTypeEd25519 = "ed25519"
)

// Limits of [KeySpec].
const (
	MinRSABits        = 2048
	MaxRSABits        = 4096
	DefaultRSABits    = 2048
	DefaultCurve      = "P-256"
	maxKeyLabelLen    = 128
	maxObjectIDLen    = 64
	generatedIDLength = 16
)

// KeySpec describes a key pair for [Module.Generate].
type KeySpec struct {
	// Type is "rsa", "ecdsa" or "ed25519".
	Type string
	// Bits is the RSA modulus size: a multiple of 8 from 2048 to 4096.
	// Zero means 2048. It must be 0 for other types.
	Bits int
	// Curve is the ECDSA curve: "P-256" or "P-384". Empty means P-256. It
	// must be empty for other types.
	Curve string
	// Label is the CKA_LABEL of both halves: UTF-8, 1 to 128 bytes.
	// Required.
	Label string
	// ID is the CKA_ID of both halves, 1 to 64 bytes. Nil means 16 random
	// bytes. Generate refuses an ID that a private key on the token already
	// has, because key pairs are matched by CKA_ID.
	ID []byte
}

// SpecError reports a field of a [KeySpec] that the module cannot
// generate.
type SpecError struct {
	// Field is the KeySpec field: "Type", "Bits", "Curve", "Label" or "ID".
	Field string
	// Reason says what is wrong with it, starting with its value.
	Reason string
}

func (e *SpecError) Error() string { return "hsm: KeySpec." + e.Field + " " + e.Reason }

// Validate reports whether the spec describes a key pair the module can
// generate. Errors are *[SpecError], naming the offending field.
func (s KeySpec) Validate() error {
	bad := func(field, format string, args ...any) error {
		return &SpecError{Field: field, Reason: fmt.Sprintf(format, args...)}
	}
	switch s.Type {
	case KeyTypeRSA:
		if s.Bits != 0 && (s.Bits < MinRSABits || s.Bits > MaxRSABits || s.Bits%8 != 0) {
			return bad("Bits", "is %d; an RSA key has a multiple of 8 from %d to %d bits", s.Bits, MinRSABits, MaxRSABits)
		}
		if s.Curve != "" {
			return bad("Curve", "is %q; an RSA key has no curve", s.Curve)
		}
	case KeyTypeECDSA:
		if _, err := specCurve(s.Curve); err != nil {
			return err
		}
		if s.Bits != 0 {
			return bad("Bits", "is %d; the curve sets the size of an ECDSA key", s.Bits)
		}
	case KeyTypeEd25519:
		if s.Bits != 0 {
			return bad("Bits", "is %d; an Ed25519 key has no size to choose", s.Bits)
		}
		if s.Curve != "" {
			return bad("Curve", "is %q; an Ed25519 key has no curve to choose", s.Curve)
		}
	default:
		return bad("Type", "is %q; want %q, %q or %q", s.Type, KeyTypeRSA, KeyTypeECDSA, KeyTypeEd25519)
	}
	switch {
	case s.Label == "":
		return bad("Label", "is empty")
	case len(s.Label) > maxKeyLabelLen:
		return bad("Label", "is %d bytes; at most %d are allowed", len(s.Label), maxKeyLabelLen)
	case !utf8.ValidString(s.Label):
		return bad("Label", "is not valid UTF-8")
	case s.ID != nil && len(s.ID) == 0:
		return bad("ID", "is empty; use nil for a random ID")
	case len(s.ID) > maxObjectIDLen:
		return bad("ID", "is %d bytes; at most %d are allowed", len(s.ID), maxObjectIDLen)
	}
	return nil
}

func specCurve(name string) (elliptic.Curve, error) {
	switch name {
	case "", "P-256":
		return elliptic.P256(), nil
	case "P-384":
		return elliptic.P384(), nil
	}
	return nil, &SpecError{Field: "Curve", Reason: fmt.Sprintf("is %q; want %q or %q", name, "P-256", "P-384")}
}

// curveOK reports whether an ECDSA public key is on a curve the module
// serves.
func curveOK(pub *ecdsa.PublicKey) bool {
	switch pub.Curve {
	case elliptic.P256(), elliptic.P384(), elliptic.P521():
		return true
	}
	return false
}
