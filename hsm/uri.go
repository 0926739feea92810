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
)

// URI is a parsed RFC 7512 PKCS #11 URI, such as
//
//	pkcs11:token=web;object=www.example.com?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/keyless/pin
//
// It names a token (token, serial or slot-id), optionally the keys on it
// (object is the CKA_LABEL, id the CKA_ID), and optionally the module
// (module-path) and the file holding the PIN (pin-source). Every field is
// optional; the zero value selects nothing. A URI is immutable after
// [ParseURI] returns it.
//
// The package never reads PINSource: the caller does.
type URI struct {
	// TokenLabel, TokenSerial and SlotID are the token, serial and slot-id
	// path attributes. Empty (nil) when absent.
	TokenLabel  string
	TokenSerial string
	SlotID      *int

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
	uriPathAttrs  = []string{"token", "serial", "slot-id", "object", "id", "type"}
	uriQueryAttrs = []string{"module-path", "pin-source"}
)

// ParseURI parses an RFC 7512 PKCS #11 URI. It accepts the path
// attributes token, serial, slot-id, object, id and type (which must be
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
		TokenLabel:  attrs["token"],
		TokenSerial: attrs["serial"],
		ObjectLabel: attrs["object"],
		ModulePath:  attrs["module-path"],
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
