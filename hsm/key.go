package hsm

import (
	"context"
	"crypto"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/kilnworks/kiln/station"
)

// The standard persistent handles (TCG provisioning guidance; the DPS SDKs
// use the same).
const (
	EKHandle  tpm2.TPMHandle = 0x81010001 // RSA-2048 endorsement key
	SRKHandle tpm2.TPMHandle = 0x81000001 // RSA-2048 storage root key
)

// EKCertIndex is the NV index of the RSA-2048 EK certificate.
const EKCertIndex tpm2.TPMHandle = 0x01C00002

// Key is a persistent key read from, or created in, a TPM.
type Key struct {
	Handle    tpm2.TPMHandle
	Public    []byte           // TPM2B_PUBLIC: 2-byte big-endian size, then the TPMT_PUBLIC, as the TPM returns it
	PublicKey crypto.PublicKey // the parsed public key (*rsa.PublicKey or *ecdsa.PublicKey)
	Name      []byte           // the TPM name: nameAlg, then the digest of the TPMT_PUBLIC
	Created   bool             // the key was absent and this call created and persisted it
}

// srkTemplate is the SRK template of the DPS SDKs (attributes 0x00030472),
// which is the TCG reference template of go-tpm.
var srkTemplate = tpm2.RSASRKTemplate

// ekTemplate is the TCG RSA-2048 EK template ("L-1").
var ekTemplate = tpm2.RSAEKTemplate

const (
	tpmRHEndorsement = tpm2.TPMRHEndorsement
	tpmRHOwner       = tpm2.TPMRHOwner
)

// EK returns the endorsement key at 0x81010001. When the handle is empty,
// the EK is created in the endorsement hierarchy from the TCG RSA-2048
// template and persisted there (Created is then true). A key at the handle
// that is not an RSA-2048 restricted decryption key is never evicted.
// Kinds: Conflict (a foreign key holds the handle), Unauthorized (the
// hierarchy has a password), Unavailable, Invalid.
func (t *TPM) EK(ctx context.Context) (*Key, error) {
	const op = "read EK"
	if err := t.lock(op); err != nil {
		return nil, err
	}
	defer t.mu.Unlock()
	return t.persistent(ctx, op, EKHandle, tpmRHEndorsement, ekTemplate, "EK")
}

// SRK returns the storage root key at 0x81000001, creating and persisting
// it in the owner hierarchy when absent, like EK.
// Kinds: Conflict, Unauthorized, Unavailable, Invalid.
func (t *TPM) SRK(ctx context.Context) (*Key, error) {
	const op = "read SRK"
	if err := t.lock(op); err != nil {
		return nil, err
	}
	defer t.mu.Unlock()
	return t.persistent(ctx, op, SRKHandle, tpmRHOwner, srkTemplate, "SRK")
}

// persistent reads the key at handle, or creates it under hierarchy from
// template and persists it. The caller holds t.mu.
func (t *TPM) persistent(ctx context.Context, op string, handle, hierarchy tpm2.TPMHandle, template tpm2.TPMTPublic, what string) (*Key, error) {
	if err := ctxError(ctx, op); err != nil {
		return nil, err
	}
	rp, err := tpm2.ReadPublic{ObjectHandle: handle}.Execute(t.t)
	if err == nil {
		k, err := keyOf(handle, rp.OutPublic, rp.Name)
		if err != nil {
			return nil, station.E(op, station.KindInvalid, err)
		}
		pub, _ := rp.OutPublic.Contents() // parsed by keyOf already
		if !isRSA2048Decrypt(pub) {
			return nil, station.Errorf(op, station.KindConflict,
				"0x%08X holds a key that is not an RSA-2048 %s (type %v, attributes 0x%08X); Kiln never evicts it: clear the TPM or provision this device by hand",
				uint32(handle), what, pub.Type, attrs(pub.ObjectAttributes))
		}
		return k, nil
	}
	if !errors.Is(err, tpm2.TPMRCHandle) {
		return nil, tpmError(op, err)
	}

	// Absent: create, persist, flush the transient.
	if err := ctxError(ctx, op); err != nil {
		return nil, err
	}
	cp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: hierarchy, Auth: tpm2.PasswordAuth(nil)},
		InPublic:      tpm2.New2B(template),
	}.Execute(t.t)
	if err != nil {
		return nil, tpmError("create "+what, err)
	}
	k, kerr := keyOf(handle, cp.OutPublic, cp.Name)
	if kerr == nil {
		kerr = ctxError(ctx, op)
	}
	if kerr == nil {
		_, err = tpm2.EvictControl{
			Auth:             tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
			ObjectHandle:     tpm2.NamedHandle{Handle: cp.ObjectHandle, Name: cp.Name},
			PersistentHandle: handle,
		}.Execute(t.t)
		if err != nil {
			kerr = tpmError(fmt.Sprintf("persist %s at 0x%08X", what, uint32(handle)), err)
		}
	} else if station.KindOf(kerr) == station.KindOther {
		kerr = station.E(op, station.KindInvalid, kerr)
	}
	// The transient goes whatever happened; a flush failure matters only
	// when all else went well.
	_, ferr := tpm2.FlushContext{FlushHandle: cp.ObjectHandle}.Execute(t.t)
	if kerr != nil {
		return nil, kerr
	}
	if ferr != nil {
		return nil, tpmError("flush transient "+what, ferr)
	}
	k.Created = true
	return k, nil
}

func keyOf(handle tpm2.TPMHandle, pub tpm2.TPM2BPublic, name tpm2.TPM2BName) (*Key, error) {
	b := tpm2.Marshal(pub)
	key, _, err := ParsePublic(b)
	if err != nil {
		return nil, err
	}
	return &Key{Handle: handle, Public: b, PublicKey: key, Name: append([]byte(nil), name.Buffer...)}, nil
}

func isRSA2048Decrypt(p *tpm2.TPMTPublic) bool {
	if p.Type != tpm2.TPMAlgRSA || !p.ObjectAttributes.Restricted || !p.ObjectAttributes.Decrypt || p.ObjectAttributes.SignEncrypt {
		return false
	}
	rsa, err := p.Parameters.RSADetail()
	return err == nil && rsa.KeyBits == 2048
}

func attrs(a tpm2.TPMAObject) uint32 {
	b := tpm2.Marshal(a)
	if len(b) != 4 {
		return 0
	}
	return binary.BigEndian.Uint32(b)
}

// ParsePublic parses a TPM2B_PUBLIC (2-byte big-endian size, then a
// TPMT_PUBLIC) and returns its public key (*rsa.PublicKey or
// *ecdsa.PublicKey) and the parsed structure. The size must match the
// length of b exactly. Kinds: Invalid.
func ParsePublic(b []byte) (crypto.PublicKey, *tpm2.TPMTPublic, error) {
	const op = "parse TPM2B_PUBLIC"
	if len(b) < 2 {
		return nil, nil, station.Errorf(op, station.KindInvalid, "%d bytes are too short for a TPM2B_PUBLIC", len(b))
	}
	if n := int(binary.BigEndian.Uint16(b)); n != len(b)-2 || n == 0 {
		return nil, nil, station.Errorf(op, station.KindInvalid, "TPM2B_PUBLIC size field says %d bytes but %d follow", n, len(b)-2)
	}
	pub, err := unmarshalPublic(b[2:])
	if err != nil {
		return nil, nil, station.E(op, station.KindInvalid, err)
	}
	key, err := tpm2.Pub(*pub)
	if err != nil {
		return nil, nil, station.E(op, station.KindInvalid, err)
	}
	return key, pub, nil
}

// unmarshalPublic parses a TPMT_PUBLIC that must fill b exactly, turning a
// panic of the reflective parser on hostile input into an error.
func unmarshalPublic(b []byte) (pub *tpm2.TPMTPublic, err error) {
	defer func() {
		if r := recover(); r != nil {
			pub, err = nil, fmt.Errorf("unparseable TPMT_PUBLIC: %v", r)
		}
	}()
	pub, err = tpm2.Unmarshal[tpm2.TPMTPublic](b)
	if err != nil {
		return nil, err
	}
	if n := len(tpm2.Marshal(*pub)); n != len(b) {
		return nil, fmt.Errorf("TPMT_PUBLIC is %d bytes followed by %d bytes of garbage", n, len(b)-n)
	}
	return pub, nil
}
