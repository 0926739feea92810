package e2e

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"time"
)

// This file holds a deliberately minimal TLS 1.2 client that performs an RSA
// key exchange with a ClientKeyExchange of the test's choosing, then sends
// ChangeCipherSpec and a Finished record it cannot have encrypted correctly,
// and reports the alert the server answers with. crypto/tls cannot send a
// malformed premaster, and the point is to see what an attacker sees.

const (
	recordChangeCipherSpec = 20
	recordAlert            = 21
	recordHandshake        = 22

	tlsRSAWithAES128GCMSHA256 = 0x009c
)

// rsaKexAlert runs one handshake against addr with SNI serverName. ckx gets
// the server's RSA public key and returns the EncryptedPreMasterSecret to
// send. It returns the description of the fatal alert the server sends.
func rsaKexAlert(addr, serverName string, ckx func(*rsa.PublicKey) []byte) (uint8, error) {
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))

	if err := writeRecord(conn, recordHandshake, handshake(1, clientHello(serverName))); err != nil {
		return 0, err
	}
	var pub *rsa.PublicKey
	for done := false; !done; {
		typ, body, err := readRecord(conn)
		if err != nil {
			return 0, fmt.Errorf("reading the server's flight: %w", err)
		}
		if typ == recordAlert {
			return 0, fmt.Errorf("server sent alert %d before ServerHelloDone", body[1])
		}
		if typ != recordHandshake {
			return 0, fmt.Errorf("unexpected record type %d", typ)
		}
		// Go's server sends each handshake message in its own record or
		// packs several; walk them all.
		for len(body) >= 4 {
			mt, n := body[0], int(body[1])<<16|int(body[2])<<8|int(body[3])
			if len(body) < 4+n {
				return 0, errors.New("handshake message split across records")
			}
			msg := body[4 : 4+n]
			body = body[4+n:]
			switch mt {
			case 11: // Certificate
				if len(msg) < 6 {
					return 0, errors.New("short Certificate")
				}
				cl := int(msg[3])<<16 | int(msg[4])<<8 | int(msg[5])
				cert, err := x509.ParseCertificate(msg[6 : 6+cl])
				if err != nil {
					return 0, err
				}
				var ok bool
				if pub, ok = cert.PublicKey.(*rsa.PublicKey); !ok {
					return 0, fmt.Errorf("server certificate has a %T key", cert.PublicKey)
				}
			case 14: // ServerHelloDone
				done = true
			}
		}
	}
	if pub == nil {
		return 0, errors.New("no server certificate")
	}
	ct := ckx(pub)
	body := binary.BigEndian.AppendUint16(nil, uint16(len(ct)))
	body = append(body, ct...)
	if err := writeRecord(conn, recordHandshake, handshake(16, body)); err != nil {
		return 0, err
	}
	if err := writeRecord(conn, recordChangeCipherSpec, []byte{1}); err != nil {
		return 0, err
	}
	// An AES-GCM record: 8-byte explicit nonce, 16 bytes of Finished, 16-byte tag.
	finished := make([]byte, 40)
	rand.Read(finished)
	if err := writeRecord(conn, recordHandshake, finished); err != nil {
		return 0, err
	}
	typ, alert, err := readRecord(conn)
	if err != nil {
		return 0, fmt.Errorf("reading the server's answer: %w", err)
	}
	if typ != recordAlert || len(alert) != 2 {
		return 0, fmt.Errorf("server answered with record type %d, not an alert", typ)
	}
	return alert[1], nil
}

func clientHello(serverName string) []byte {
	b := []byte{3, 3}
	random := make([]byte, 32)
	rand.Read(random)
	b = append(b, random...)
	b = append(b, 0)                                                                        // session id
	b = append(b, 0, 2, byte(tlsRSAWithAES128GCMSHA256>>8), tlsRSAWithAES128GCMSHA256&0xff) // cipher suites
	b = append(b, 1, 0)                                                                     // compression: null

	var ext []byte
	name := []byte(serverName)
	sni := binary.BigEndian.AppendUint16(nil, uint16(len(name)+3))
	sni = append(sni, 0)
	sni = binary.BigEndian.AppendUint16(sni, uint16(len(name)))
	sni = append(sni, name...)
	ext = appendExtension(ext, 0x0000, sni)
	// signature_algorithms: rsa_pkcs1_sha256, rsa_pss_rsae_sha256.
	ext = appendExtension(ext, 0x000d, []byte{0, 4, 0x04, 0x01, 0x08, 0x04})
	ext = appendExtension(ext, 0xff01, []byte{0}) // renegotiation_info
	b = binary.BigEndian.AppendUint16(b, uint16(len(ext)))
	return append(b, ext...)
}

func appendExtension(b []byte, typ uint16, data []byte) []byte {
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint16(b, uint16(len(data)))
	return append(b, data...)
}

func handshake(typ byte, body []byte) []byte {
	return append([]byte{typ, byte(len(body) >> 16), byte(len(body) >> 8), byte(len(body))}, body...)
}

func writeRecord(w io.Writer, typ byte, body []byte) error {
	hdr := []byte{typ, 3, 3, byte(len(body) >> 8), byte(len(body))}
	_, err := w.Write(append(hdr, body...))
	return err
}

func readRecord(r io.Reader) (byte, []byte, error) {
	hdr := make([]byte, 5)
	if _, err := io.ReadFull(r, hdr); err != nil {
		return 0, nil, err
	}
	body := make([]byte, int(hdr[3])<<8|int(hdr[4]))
	if _, err := io.ReadFull(r, body); err != nil {
		return 0, nil, err
	}
	return hdr[0], body, nil
}

// rawRSAEncrypt returns m^e mod n as a k-byte big-endian string: the
// ciphertext of an arbitrary (possibly badly padded) encoded message em.
func rawRSAEncrypt(pub *rsa.PublicKey, em []byte) []byte {
	m := new(big.Int).SetBytes(em)
	c := new(big.Int).Exp(m, big.NewInt(int64(pub.E)), pub.N)
	return c.FillBytes(make([]byte, pub.Size()))
}

// pkcs1Block returns a PKCS #1 v1.5 type-2 block for payload, with the
// block type byte replaced by blockType.
func pkcs1Block(pub *rsa.PublicKey, payload []byte, blockType byte) []byte {
	k := pub.Size()
	em := make([]byte, k)
	em[1] = blockType
	ps := em[2 : k-len(payload)-1]
	for i := range ps {
		for ps[i] == 0 {
			rand.Read(ps[i : i+1])
		}
	}
	copy(em[k-len(payload):], payload)
	return em
}
