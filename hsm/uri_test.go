package hsm

import (
	"bytes"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"
)

func TestParseURI(t *testing.T) {
	slot := func(n int) *int { return &n }
	tests := []struct {
		in   string
		want URI
	}{
		{"pkcs11:", URI{}},
		{"pkcs11:token=web", URI{TokenLabel: "web"}},
		{"PKCS11:token=web", URI{TokenLabel: "web"}},
		{"pkcs11:serial=0123abcd;object=a.example", URI{TokenSerial: "0123abcd", ObjectLabel: "a.example"}},
		{"pkcs11:slot-id=7;type=private", URI{SlotID: slot(7)}},
		{"pkcs11:token=My%20Token;object=www%3Bexample", URI{TokenLabel: "My Token", ObjectLabel: "www;example"}},
		{"pkcs11:id=%01%02%ff%00", URI{ObjectID: []byte{1, 2, 0xff, 0}}},
		{"pkcs11:id=ab", URI{ObjectID: []byte("ab")}},
		{"pkcs11:token=t?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/keyless/pin",
			URI{TokenLabel: "t", ModulePath: "/usr/lib/softhsm/libsofthsm2.so", PINSource: "/etc/keyless/pin"}},
		{"pkcs11:token=t?pin-source=file:///etc/pin", URI{TokenLabel: "t", PINSource: "/etc/pin"}},
		{"pkcs11:token=t?pin-source=/etc/pin", URI{TokenLabel: "t", PINSource: "/etc/pin"}},
		{"pkcs11:token=t?pin-source=%2Fetc%2Fpin", URI{TokenLabel: "t", PINSource: "/etc/pin"}},
	}
	for _, tt := range tests {
		got, err := ParseURI(tt.in)
		if err != nil {
			t.Errorf("ParseURI(%q): %v", tt.in, err)
			continue
		}
		if got.TokenLabel != tt.want.TokenLabel || got.TokenSerial != tt.want.TokenSerial ||
			got.ObjectLabel != tt.want.ObjectLabel || !bytes.Equal(got.ObjectID, tt.want.ObjectID) ||
			(got.ObjectID == nil) != (tt.want.ObjectID == nil) ||
			got.ModulePath != tt.want.ModulePath || got.PINSource != tt.want.PINSource ||
			(got.SlotID == nil) != (tt.want.SlotID == nil) || got.SlotID != nil && *got.SlotID != *tt.want.SlotID {
			t.Errorf("ParseURI(%q) = %+v, want %+v", tt.in, *got, tt.want)
		}
		// String gives a URI that parses to the same thing.
		again, err := ParseURI(got.String())
		if err != nil || again.String() != got.String() {
			t.Errorf("ParseURI(%q).String() = %q does not round-trip: %v", tt.in, got.String(), err)
		}
	}
}

func TestParseURIErrors(t *testing.T) {
	tests := []struct {
		in, want string
	}{
		{"", `"pkcs11:" scheme`},
		{"file:/etc/pin", `"pkcs11:" scheme`},
		{"pkcs11:token", "want name=value"},
		{"pkcs11:=x", "want name=value"},
		{"pkcs11:token=a;token=b", "token is repeated"},
		{"pkcs11:object=", "object is empty"},
		{"pkcs11:id=%zz", "bad percent-encoding"},
		{"pkcs11:slot-id=x", "slot-id"},
		{"pkcs11:slot-id=-1", "slot-id"},
		{"pkcs11:type=cert", "only private keys"},
		{"pkcs11:type=public", "only private keys"},
		{"pkcs11:token=" + strings.Repeat("x", 33), "at most 32"},
		{"pkcs11:token=t#frag", "fragment"},
		{"pkcs11:manufacturer=SoftHSM;x-vendor=1;token=t?module-name=softhsm2", "unsupported attributes x-vendor, module-name"},
		{"pkcs11:token=t?module-path=lib/softhsm2.so", "not an absolute file name"},
		{"pkcs11:token=t?pin-source=pin.txt", "absolute file name"},
		{"pkcs11:token=t?pin-source=file:pin.txt", "absolute file name"},
		{"pkcs11:token=t?pin-source=file://host/etc/pin", "want file:/absolute/path"},
		{"pkcs11:token=t?pin-source=https://example.com/pin", "only file: sources"},
		{"pkcs11:token=t?pin-value=s3cret-1234", "pin-value is refused"},
		{"pkcs11:token=t;pin-value=s3cret-1234", "pin-value is refused"},
	}
	for _, tt := range tests {
		_, err := ParseURI(tt.in)
		if err == nil {
			t.Errorf("ParseURI(%q) succeeded; want an error containing %q", tt.in, tt.want)
			continue
		}
		if !strings.Contains(err.Error(), tt.want) {
			t.Errorf("ParseURI(%q) = %v; want an error containing %q", tt.in, err, tt.want)
		}
		if strings.Contains(err.Error(), "s3cret") {
			t.Errorf("ParseURI(%q): the error shows the PIN: %v", tt.in, err)
		}
	}
}

func TestURIMatchKey(t *testing.T) {
	u, err := ParseURI("pkcs11:token=t;object=a;id=%01%02")
	if err != nil {
		t.Fatal(err)
	}
	if !u.SelectsToken() || !u.SelectsKeys() {
		t.Errorf("SelectsToken, SelectsKeys = %t, %t; want both true", u.SelectsToken(), u.SelectsKeys())
	}
	for _, tt := range []struct {
		uri, label string
		id         []byte
		want       bool
	}{
		{"pkcs11:token=t;object=a;id=%01%02", "a", []byte{1, 2}, true},
		{"pkcs11:token=t;object=a;id=%01%02", "a", []byte{1, 3}, false},
		{"pkcs11:token=t;object=a;id=%01%02", "b", []byte{1, 2}, false},
		{"pkcs11:object=a", "a", []byte{9}, true},
		{"pkcs11:id=%09", "anything", []byte{9}, true},
		{"pkcs11:token=t", "anything", nil, true},
	} {
		u, err := ParseURI(tt.uri)
		if err != nil {
			t.Fatal(err)
		}
		if got := u.MatchKey(tt.label, tt.id); got != tt.want {
			t.Errorf("ParseURI(%q).MatchKey(%q, %x) = %t, want %t", tt.uri, tt.label, tt.id, got, tt.want)
		}
	}
}

// TestParseURIFromTools parses URIs as p11tool and pkcs11-tool print them,
// with the token, slot and library attributes of RFC 7512, and checks
// what each matches.
func TestParseURIFromTools(t *testing.T) {
	u, err := ParseURI("pkcs11:model=SoftHSM%20v2;manufacturer=SoftHSM%20project;serial=c79b6fa882de6672;token=web;" +
		"slot-description=SoftHSM%20slot%20ID%200x1;slot-manufacturer=SoftHSM%20project;" +
		"library-manufacturer=SoftHSM;library-description=Implementation%20of%20PKCS11;library-version=2.6;" +
		"id=%01;object=www;type=private")
	if err != nil {
		t.Fatal(err)
	}
	ti := pkcs11.TokenInfo{Label: "web", SerialNumber: "c79b6fa882de6672", ManufacturerID: "SoftHSM project", Model: "SoftHSM v2"}
	si := pkcs11.SlotInfo{SlotDescription: "SoftHSM slot ID 0x1", ManufacturerID: "SoftHSM project"}
	info := pkcs11.Info{ManufacturerID: "SoftHSM", LibraryDescription: "Implementation of PKCS11", LibraryVersion: pkcs11.Version{Major: 2, Minor: 6}}
	if !u.matchToken(1, ti, si) || !u.matchLibrary(info) || !u.needsSlotInfo() || !u.needsLibraryInfo() {
		t.Fatalf("%s does not match the token it was copied from", u)
	}
	for name, edit := range map[string]func(*pkcs11.TokenInfo, *pkcs11.SlotInfo){
		"model":             func(ti *pkcs11.TokenInfo, _ *pkcs11.SlotInfo) { ti.Model = "Other" },
		"manufacturer":      func(ti *pkcs11.TokenInfo, _ *pkcs11.SlotInfo) { ti.ManufacturerID = "Other" },
		"serial":            func(ti *pkcs11.TokenInfo, _ *pkcs11.SlotInfo) { ti.SerialNumber = "0" },
		"token":             func(ti *pkcs11.TokenInfo, _ *pkcs11.SlotInfo) { ti.Label = "other" },
		"slot-description":  func(_ *pkcs11.TokenInfo, si *pkcs11.SlotInfo) { si.SlotDescription = "other" },
		"slot-manufacturer": func(_ *pkcs11.TokenInfo, si *pkcs11.SlotInfo) { si.ManufacturerID = "other" },
	} {
		ti, si := ti, si
		edit(&ti, &si)
		if u.matchToken(1, ti, si) {
			t.Errorf("a token with another %s matches %s", name, u)
		}
	}
	for _, v := range []pkcs11.Version{{Major: 2, Minor: 5}, {Major: 3, Minor: 6}} {
		i := info
		i.LibraryVersion = v
		if u.matchLibrary(i) {
			t.Errorf("library version %d.%d matches library-version=2.6", v.Major, v.Minor)
		}
	}
	// "M" means "M.0".
	if u, err := ParseURI("pkcs11:library-version=3"); err != nil || !u.matchLibrary(pkcs11.Info{LibraryVersion: pkcs11.Version{Major: 3}}) {
		t.Errorf("library-version=3 does not match 3.0: %v", err)
	}
	// The attributes survive String.
	again, err := ParseURI(u.String())
	if err != nil || again.String() != u.String() || again.SlotDescription != u.SlotDescription || again.LibraryVersion != "2.6" {
		t.Errorf("String() = %q does not round-trip: %v", u.String(), err)
	}
	for _, bad := range []string{"pkcs11:library-version=x", "pkcs11:library-version=2.x", "pkcs11:library-version=256", "pkcs11:library-version=1.2.3"} {
		if _, err := ParseURI(bad); err == nil || !strings.Contains(err.Error(), "library-version") {
			t.Errorf("ParseURI(%q) = %v; want an error naming library-version", bad, err)
		}
	}
}
