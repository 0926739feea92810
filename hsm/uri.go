package hsm

import (
	"bytes"
	"errors"
	"fmt"
	"net/url"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/miekg/pkcs11"
)

// URI is a parsed RFC 7512 PKCS #11 URI, such as
//
//	pkcs11:token=web;object=www.example.com?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/keyless/pin
//
// It names a token (token, serial or slot-id, narrowed further by the
// token's manufacturer and model, its slot's slot-description and
// slot-manufacturer, and the library's library-manufacturer,
// library-description and library-version, as `p11tool --list-privkeys`
// and `pkcs11-tool` print them), optionally the keys on it (object is the
// CKA_LABEL, id the CKA_ID), and optionally the module (module-path) and
// the file holding the PIN (pin-source). Every field is optional; the zero
// value selects nothing. A URI is immutable after [ParseURI] returns it.
//
// The package never reads PINSource: the caller does.
type URI struct {
	// TokenLabel, TokenSerial and SlotID are the token, serial and slot-id
	// path attributes. Empty (nil) when absent.
	TokenLabel  string
	TokenSerial string
	SlotID      *int

	// TokenManufacturer and TokenModel are the manufacturer and model
	// path attributes: CK_TOKEN_INFO's manufacturerID and model.
	TokenManufacturer string
	TokenModel        string

	// SlotDescription and SlotManufacturer are the slot-description and
	// slot-manufacturer path attributes (CK_SLOT_INFO).
	SlotDescription  string
	SlotManufacturer string

	// LibraryManufacturer, LibraryDescription and LibraryVersion are the
	// library-manufacturer, library-description and library-version path
	// attributes (CK_INFO). LibraryVersion is "major" or "major.minor".
	LibraryManufacturer string
	LibraryDescription  string
	LibraryVersion      string

	// ObjectLabel and ObjectID are the object and id path attributes:
	// the CKA_LABEL and CKA_ID of the keys the URI selects. Empty (nil)
	// when absent.
	ObjectLabel string
	ObjectID    []byte

	// ModulePath is the module-path query attribute: an absolute file name.
	ModulePath string

	// PINSource is the pin-source query attribute as an absolute file
	// name (a "file:" URI is reduced to its path).
	PINSource string
}

// uriAttrs are the attributes ParseURI accepts, by part.
var (
	uriPathAttrs = []string{"token", "serial", "slot-id", "manufacturer", "model",
		"slot-description", "slot-manufacturer", "library-manufacturer", "library-description", "library-version",
		"object", "id", "type"}
	uriQueryAttrs = []string{"module-path", "pin-source"}
)

// ParseURI parses an RFC 7512 PKCS #11 URI. It accepts the path
// attributes token, serial, slot-id, manufacturer, model,
// slot-description, slot-manufacturer, library-manufacturer,
// library-description, library-version, object, id and type (which must be
// "private"), and the query attributes module-path and pin-source.
//
// It returns an error for a malformed URI, a repeated or empty attribute,
// any other attribute (naming every one), a relative module-path or
// pin-source, and for pin-value: a PIN must not be written in a URI, where
// it would end up in command lines, configuration files and logs. Errors
// never contain the value of pin-value.
func ParseURI(s string) (*URI, error) {
	const scheme = "pkcs11:"
	if len(s) < len(scheme) || !strings.EqualFold(s[:len(scheme)], scheme) {
		return nil, errors.New(`hsm: PKCS #11 URI: want the "pkcs11:" scheme`)
	}
	path, query, _ := strings.Cut(s[len(scheme):], "?")
	if strings.ContainsRune(query, '#') || strings.ContainsRune(path, '#') {
		return nil, errors.New("hsm: PKCS #11 URI: a fragment (#) is not allowed")
	}
	attrs := make(map[string]string)
	var unknown []string
	parse := func(part, sep string, known []string) error {
		if part == "" {
			return nil
		}
		for _, a := range strings.Split(part, sep) {
			name, value, ok := strings.Cut(a, "=")
			if !ok || name == "" {
				return fmt.Errorf("hsm: PKCS #11 URI: attribute %q: want name=value", a)
			}
			if name == "pin-value" {
				return errors.New("hsm: PKCS #11 URI: pin-value is refused: a PIN must never be written in a URI, a command line or a configuration file; use pin-source=file:/path (a file of mode 0600) instead")
			}
			if !slices.Contains(known, name) {
				unknown = append(unknown, name)
				continue
			}
			if _, dup := attrs[name]; dup {
				return fmt.Errorf("hsm: PKCS #11 URI: attribute %s is repeated", name)
			}
			v, err := url.PathUnescape(value)
			if err != nil {
				return fmt.Errorf("hsm: PKCS #11 URI: attribute %s: bad percent-encoding: %w", name, err)
			}
			if v == "" {
				return fmt.Errorf("hsm: PKCS #11 URI: attribute %s is empty", name)
			}
			attrs[name] = v
		}
		return nil
	}
	if err := parse(path, ";", uriPathAttrs); err != nil {
		return nil, err
	}
	if err := parse(query, "&", uriQueryAttrs); err != nil {
		return nil, err
	}
	if len(unknown) > 0 {
		return nil, fmt.Errorf("hsm: PKCS #11 URI: unsupported attributes %s (supported: path %s; query %s)",
			strings.Join(unknown, ", "), strings.Join(uriPathAttrs, ", "), strings.Join(uriQueryAttrs, ", "))
	}
	u := &URI{
		TokenLabel:          attrs["token"],
		TokenSerial:         attrs["serial"],
		TokenManufacturer:   attrs["manufacturer"],
		TokenModel:          attrs["model"],
		SlotDescription:     attrs["slot-description"],
		SlotManufacturer:    attrs["slot-manufacturer"],
		LibraryManufacturer: attrs["library-manufacturer"],
		LibraryDescription:  attrs["library-description"],
		LibraryVersion:      attrs["library-version"],
		ObjectLabel:         attrs["object"],
		ModulePath:          attrs["module-path"],
	}
	if v := u.LibraryVersion; v != "" {
		if _, _, err := parseVersion(v); err != nil {
			return nil, fmt.Errorf("hsm: PKCS #11 URI: library-version %q: want major or major.minor, decimal numbers below 256", v)
		}
	}
	if v, ok := attrs["id"]; ok {
		u.ObjectID = []byte(v)
	}
	if v, ok := attrs["slot-id"]; ok {
		n, err := strconv.ParseUint(v, 10, 31)
		if err != nil {
			return nil, fmt.Errorf("hsm: PKCS #11 URI: slot-id %q: want a decimal number", v)
		}
		slot := int(n)
		u.SlotID = &slot
	}
	if v, ok := attrs["type"]; ok && v != "private" {
		return nil, fmt.Errorf("hsm: PKCS #11 URI: type %q: only private keys are served (type=private, or no type)", v)
	}
	if len(u.TokenLabel) > maxTokenLabelLen {
		return nil, fmt.Errorf("hsm: PKCS #11 URI: token is %d bytes; a PKCS #11 token label has at most %d", len(u.TokenLabel), maxTokenLabelLen)
	}
	if u.ModulePath != "" && !filepath.IsAbs(u.ModulePath) {
		return nil, fmt.Errorf("hsm: PKCS #11 URI: module-path %q is not an absolute file name", u.ModulePath)
	}
	if v, ok := attrs["pin-source"]; ok {
		p, err := pinSourcePath(v)
		if err != nil {
			return nil, err
		}
		u.PINSource = p
	}
	return u, nil
}

// pinSourcePath returns the file named by a pin-source value: "file:/p",
// "file:///p" or "/p".
func pinSourcePath(v string) (string, error) {
	p := v
	if rest, ok := strings.CutPrefix(v, "file:"); ok {
		p = rest
		if h, ok := strings.CutPrefix(rest, "//"); ok {
			// file://host/path: only an empty host (the local machine).
			if !strings.HasPrefix(h, "/") {
				return "", fmt.Errorf("hsm: PKCS #11 URI: pin-source %q: want file:/absolute/path", v)
			}
			p = h
		}
	} else if strings.Contains(v, ":") && !strings.HasPrefix(v, "/") {
		return "", fmt.Errorf("hsm: PKCS #11 URI: pin-source %q: only file: sources are supported", v)
	}
	if !filepath.IsAbs(p) {
		return "", fmt.Errorf("hsm: PKCS #11 URI: pin-source %q: want an absolute file name", v)
	}
	return filepath.Clean(p), nil
}

// SelectsToken reports whether the URI names a token.
func (u *URI) SelectsToken() bool {
	return u.TokenLabel != "" || u.TokenSerial != "" || u.SlotID != nil
}

// parseVersion parses a library-version value, "M" or "M.N" (RFC 7512,
// section 2.3: "M" means "M.0").
func parseVersion(v string) (major, minor byte, err error) {
	a, b, hasMinor := strings.Cut(v, ".")
	ma, err := strconv.ParseUint(a, 10, 8)
	if err != nil {
		return 0, 0, err
	}
	var mi uint64
	if hasMinor {
		if mi, err = strconv.ParseUint(b, 10, 8); err != nil {
			return 0, 0, err
		}
	}
	return byte(ma), byte(mi), nil
}

// matchLibrary reports whether the library's CK_INFO matches the URI's
// library attributes.
func (u *URI) matchLibrary(info pkcs11.Info) bool {
	if u.LibraryManufacturer != "" && strings.TrimRight(info.ManufacturerID, " ") != u.LibraryManufacturer {
		return false
	}
	if u.LibraryDescription != "" && strings.TrimRight(info.LibraryDescription, " ") != u.LibraryDescription {
		return false
	}
	if u.LibraryVersion != "" {
		major, minor, _ := parseVersion(u.LibraryVersion)
		if info.LibraryVersion.Major != major || info.LibraryVersion.Minor != minor {
			return false
		}
	}
	return true
}

// needsSlotInfo reports whether matching needs the slot's CK_SLOT_INFO.
func (u *URI) needsSlotInfo() bool { return u.SlotDescription != "" || u.SlotManufacturer != "" }

// needsLibraryInfo reports whether matching needs the library's CK_INFO.
func (u *URI) needsLibraryInfo() bool {
	return u.LibraryManufacturer != "" || u.LibraryDescription != "" || u.LibraryVersion != ""
}

// matchToken reports whether the token in slot, with its CK_TOKEN_INFO
// and (if needsSlotInfo) CK_SLOT_INFO, matches every token and slot
// attribute of the URI.
func (u *URI) matchToken(slot uint, ti pkcs11.TokenInfo, si pkcs11.SlotInfo) bool {
	trim := func(s string) string { return strings.TrimRight(s, " ") }
	switch {
	case u.TokenLabel != "" && trim(ti.Label) != u.TokenLabel,
		u.TokenSerial != "" && trim(ti.SerialNumber) != u.TokenSerial,
		u.SlotID != nil && uint(*u.SlotID) != slot,
		u.TokenManufacturer != "" && trim(ti.ManufacturerID) != u.TokenManufacturer,
		u.TokenModel != "" && trim(ti.Model) != u.TokenModel,
		u.SlotDescription != "" && trim(si.SlotDescription) != u.SlotDescription,
		u.SlotManufacturer != "" && trim(si.ManufacturerID) != u.SlotManufacturer:
		return false
	}
	return true
}

// SelectsKeys reports whether the URI names keys (object or id).
func (u *URI) SelectsKeys() bool {
	return u.ObjectLabel != "" || u.ObjectID != nil
}

// MatchKey reports whether a key with CKA_LABEL label and CKA_ID id is
// one the URI selects: every key-naming attribute present must be equal.
// A URI that names no keys matches every key.
func (u *URI) MatchKey(label string, id []byte) bool {
	if u.ObjectLabel != "" && label != u.ObjectLabel {
		return false
	}
	if u.ObjectID != nil && !bytes.Equal(id, u.ObjectID) {
		return false
	}
	return true
}

// String formats the URI, with every attribute percent-encoded as needed
// and the id fully percent-encoded. It never contains a PIN.
func (u *URI) String() string {
	var path, query []string
	add := func(dst *[]string, name, value string) {
		if value != "" {
			*dst = append(*dst, name+"="+uriEscape(value))
		}
	}
	add(&path, "token", u.TokenLabel)
	add(&path, "serial", u.TokenSerial)
	if u.SlotID != nil {
		path = append(path, "slot-id="+strconv.Itoa(*u.SlotID))
	}
	add(&path, "manufacturer", u.TokenManufacturer)
	add(&path, "model", u.TokenModel)
	add(&path, "slot-description", u.SlotDescription)
	add(&path, "slot-manufacturer", u.SlotManufacturer)
	add(&path, "library-manufacturer", u.LibraryManufacturer)
	add(&path, "library-description", u.LibraryDescription)
	add(&path, "library-version", u.LibraryVersion)
	add(&path, "object", u.ObjectLabel)
	if u.ObjectID != nil {
		var b strings.Builder
		for _, c := range u.ObjectID {
			fmt.Fprintf(&b, "%%%02X", c)
		}
		path = append(path, "id="+b.String())
	}
	add(&query, "module-path", u.ModulePath)
	add(&query, "pin-source", u.PINSource)
	s := "pkcs11:" + strings.Join(path, ";")
	if len(query) > 0 {
		s += "?" + strings.Join(query, "&")
	}
	return s
}

// uriEscape percent-encodes everything but RFC 3986 unreserved characters
// and '/' (allowed in both parts of a PKCS #11 URI).
func uriEscape(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("-._~/", c) >= 0 {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}

// tokenPart formats the URI's token, slot and library attributes only, for
// messages.
func (u *URI) tokenPart() string {
	return (&URI{
		TokenLabel: u.TokenLabel, TokenSerial: u.TokenSerial, SlotID: u.SlotID,
		TokenManufacturer: u.TokenManufacturer, TokenModel: u.TokenModel,
		SlotDescription: u.SlotDescription, SlotManufacturer: u.SlotManufacturer,
		LibraryManufacturer: u.LibraryManufacturer, LibraryDescription: u.LibraryDescription, LibraryVersion: u.LibraryVersion,
	}).String()
}
