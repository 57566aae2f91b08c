package hsm

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/kilnworks/kiln/station"
)

// DPSKeyHandle is the persistent handle of the DPS ID key: the HMAC key that
// a Device Provisioning Service sends to the device in an activation blob.
// It belongs to DPS: ActivateDPS replaces whatever holds it, on every
// activation, as the Azure IoT SDKs do. It is the one persistent handle hsm
// ever evicts.
const DPSKeyHandle tpm2.TPMHandle = 0x81000100

// hmacChunk is the most data one TPM2_HMAC or TPM2_SequenceUpdate carries:
// MAX_DIGEST_BUFFER, which every TPM 2.0 supports at 1024 bytes or more.
const hmacChunk = 1024

// ActivationBlob is a DPS TPM activation blob (the base64-decoded
// authenticationKey of a TPM challenge or of a registration state) split
// into its six fields. Each field holds the contents of its TPM2B, without
// the 2-byte size.
type ActivationBlob struct {
	// Credential is the TPM2B_ID_OBJECT of TPM2_MakeCredential: the
	// integrity HMAC as a TPM2B_DIGEST, then the encrypted credential
	// (the 16-byte inner wrapping key). It is bound to the SRK's name.
	Credential []byte
	// CredentialSeed is the TPM2B_ENCRYPTED_SECRET that protects
	// Credential: a seed encrypted to the EK (RSA-OAEP, label "IDENTITY").
	CredentialSeed []byte
	// Duplicate is the TPM2B_PRIVATE of the ID key duplicated to the SRK:
	// the outer HMAC as a TPM2B_DIGEST, then the sensitive area encrypted
	// under the inner key and again under the outer (SRK) wrapper.
	Duplicate []byte
	// DuplicateSeed is the TPM2B_ENCRYPTED_SECRET of the outer wrapper: a
	// seed encrypted to the SRK (RSA-OAEP, label "DUPLICATE").
	DuplicateSeed []byte
	// Public is the TPMT_PUBLIC of the ID key: a keyedHash HMAC key.
	Public []byte
	// Data is the TPM2B_DATA "encUriData" that DPS appends; the SDKs read
	// it and ignore it, and so does ActivateDPS. It may be empty.
	Data []byte
}

// ParseActivationBlob splits a DPS activation blob into its fields and checks
// that each is well formed enough to hand to a TPM: the credential and the
// duplicate start with a digest, the seeds are not empty and the public area
// is a keyedHash HMAC key. Bytes after the sixth field are ignored, as the
// Node SDK does. It never panics. Kinds: Invalid.
func ParseActivationBlob(b []byte) (*ActivationBlob, error) {
	const op = "parse DPS activation blob"
	var a ActivationBlob
	fields := []struct {
		name string
		dst  *[]byte
	}{
		{"credential (TPM2B_ID_OBJECT)", &a.Credential},
		{"credential seed (TPM2B_ENCRYPTED_SECRET)", &a.CredentialSeed},
		{"duplicate (TPM2B_PRIVATE)", &a.Duplicate},
		{"duplication seed (TPM2B_ENCRYPTED_SECRET)", &a.DuplicateSeed},
		{"ID key public area (TPM2B_PUBLIC)", &a.Public},
		{"encrypted data (TPM2B_DATA)", &a.Data},
	}
	rest := b
	for i, f := range fields {
		if len(rest) < 2 {
			return nil, station.Errorf(op, station.KindInvalid,
				"the blob ends before field %d, the %s: it is %d bytes, truncated or not an activation blob", i+1, f.name, len(b))
		}
		n := int(binary.BigEndian.Uint16(rest))
		if n > len(rest)-2 {
			return nil, station.Errorf(op, station.KindInvalid,
				"field %d, the %s, says %d bytes but only %d follow: the blob is truncated or corrupt", i+1, f.name, n, len(rest)-2)
		}
		*f.dst = rest[2 : 2+n : 2+n]
		rest = rest[2+n:]
	}
	if err := checkDigestPrefixed(a.Credential); err != nil {
		return nil, station.Errorf(op, station.KindInvalid, "the credential is malformed: %w", err)
	}
	if err := checkDigestPrefixed(a.Duplicate); err != nil {
		return nil, station.Errorf(op, station.KindInvalid, "the duplicate is malformed: %w", err)
	}
	if len(a.CredentialSeed) == 0 || len(a.DuplicateSeed) == 0 {
		return nil, station.Errorf(op, station.KindInvalid, "an encrypted seed is empty: the blob is corrupt")
	}
	if _, err := idKeyHash(a.Public); err != nil {
		return nil, station.E(op, station.KindInvalid, err)
	}
	return &a, nil
}

// checkDigestPrefixed checks that b is a TPM2B_DIGEST of a plausible size
// followed by at least one byte of ciphertext.
func checkDigestPrefixed(b []byte) error {
	if len(b) < 2 {
		return fmt.Errorf("%d bytes are too short", len(b))
	}
	n := int(binary.BigEndian.Uint16(b))
	if n == 0 || n > 64 {
		return fmt.Errorf("its HMAC is %d bytes, not a digest", n)
	}
	if n >= len(b)-2 {
		return fmt.Errorf("its HMAC of %d bytes leaves no encrypted data", n)
	}
	return nil
}

// idKeyHash parses the TPMT_PUBLIC of a DPS ID key and returns the hash of
// its HMAC scheme.
func idKeyHash(public []byte) (tpm2.TPMIAlgHash, error) {
	pub, err := unmarshalPublic(public)
	if err != nil {
		return 0, fmt.Errorf("the ID key public area: %w", err)
	}
	if pub.Type != tpm2.TPMAlgKeyedHash {
		return 0, fmt.Errorf("the ID key is of type %v, not a keyedHash (HMAC) key", pub.Type)
	}
	detail, err := pub.Parameters.KeyedHashDetail()
	if err != nil {
		return 0, fmt.Errorf("the ID key public area: %w", err)
	}
	if detail.Scheme.Scheme != tpm2.TPMAlgHMAC {
		return 0, fmt.Errorf("the ID key's scheme is %v, not HMAC", detail.Scheme.Scheme)
	}
	h, err := detail.Scheme.Details.HMAC()
	if err != nil {
		return 0, fmt.Errorf("the ID key's HMAC scheme: %w", err)
	}
	if _, err := h.HashAlg.Hash(); err != nil {
		return 0, fmt.Errorf("the ID key's HMAC hash %v is not supported", h.HashAlg)
	}
	return h.HashAlg, nil
}

// Marshal returns the blob in wire form: the six fields, each with its
// 2-byte big-endian size. It panics if a field exceeds 65535 bytes.
func (a *ActivationBlob) Marshal() []byte {
	fields := [][]byte{a.Credential, a.CredentialSeed, a.Duplicate, a.DuplicateSeed, a.Public, a.Data}
	n := 0
	for _, f := range fields {
		n += 2 + len(f)
	}
	out := make([]byte, 0, n)
	for _, f := range fields {
		if len(f) > 0xFFFF {
			panic(fmt.Sprintf("hsm: activation blob field of %d bytes", len(f)))
		}
		out = binary.BigEndian.AppendUint16(out, uint16(len(f)))
		out = append(out, f...)
	}
	return out
}

// ActivateDPS imports the ID key of a DPS activation blob (the decoded
// authenticationKey) into the TPM and persists it at DPSKeyHandle, replacing
// the key there. It runs the Azure IoT SDKs' sequence: a policy session
// satisfied by PolicySecret(endorsement) for the EK, ActivateCredential
// (EK and SRK at their standard handles) to recover the inner wrapping key,
// Import of the duplicate under the SRK with that key, Load, then
// EvictControl. The EK and the SRK must exist already (EK and SRK create
// them). The TPM is held for the whole sequence; ctx is checked between
// commands. Kinds: Invalid (a malformed blob, or one made for another
// TPM's EK or SRK), NotFound (no EK or SRK), Unauthorized (the endorsement
// or owner hierarchy has a password), Unavailable.
func (t *TPM) ActivateDPS(ctx context.Context, blob []byte) error {
	const op = "activate DPS key"
	a, err := ParseActivationBlob(blob)
	if err != nil {
		return err
	}
	if err := t.lock(op); err != nil {
		return err
	}
	defer t.mu.Unlock()

	ek, err := t.readName(ctx, op, EKHandle, "EK")
	if err != nil {
		return err
	}
	srk, err := t.readName(ctx, op, SRKHandle, "SRK")
	if err != nil {
		return err
	}

	// Recover the inner wrapping key.
	if err := ctxError(ctx, op); err != nil {
		return err
	}
	sess, closeSess, err := tpm2.PolicySession(t.t, tpm2.TPMAlgSHA256, 16)
	if err != nil {
		return tpmError("start EK policy session", err)
	}
	defer func() { _ = closeSess() }()
	if err := ctxError(ctx, op); err != nil {
		return err
	}
	if _, err := (tpm2.PolicySecret{
		AuthHandle:    tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
		PolicySession: sess.Handle(),
		NonceTPM:      sess.NonceTPM(),
	}).Execute(t.t); err != nil {
		return tpmError("satisfy EK policy (PolicySecret endorsement)", err)
	}
	if err := ctxError(ctx, op); err != nil {
		return err
	}
	ac, err := tpm2.ActivateCredential{
		ActivateHandle: tpm2.AuthHandle{Handle: SRKHandle, Name: srk, Auth: tpm2.PasswordAuth(nil)},
		KeyHandle:      tpm2.AuthHandle{Handle: EKHandle, Name: ek, Auth: sess},
		CredentialBlob: tpm2.TPM2BIDObject{Buffer: a.Credential},
		Secret:         tpm2.TPM2BEncryptedSecret{Buffer: a.CredentialSeed},
	}.Execute(t.t)
	if err != nil {
		return blobError("activate the DPS credential", err,
			"the blob was not made for this TPM's EK and SRK, or it is corrupt: check that the enrollment holds this device's EK and that the server was sent this device's SRK")
	}
	inner := ac.CertInfo.Buffer
	if n := len(inner); n != 16 && n != 24 && n != 32 {
		return station.Errorf(op, station.KindInvalid,
			"the credential holds %d bytes, not an AES key: the server built the blob wrongly", n)
	}

	// Import the duplicate under the SRK and load it.
	if err := ctxError(ctx, op); err != nil {
		return err
	}
	public := tpm2.BytesAs2B[tpm2.TPMTPublic](a.Public)
	srkAuth := tpm2.AuthHandle{Handle: SRKHandle, Name: srk, Auth: tpm2.PasswordAuth(nil)}
	imp, err := tpm2.Import{
		ParentHandle:  srkAuth,
		EncryptionKey: tpm2.TPM2BData{Buffer: inner},
		ObjectPublic:  public,
		Duplicate:     tpm2.TPM2BPrivate{Buffer: a.Duplicate},
		InSymSeed:     tpm2.TPM2BEncryptedSecret{Buffer: a.DuplicateSeed},
		Symmetric: tpm2.TPMTSymDef{
			Algorithm: tpm2.TPMAlgAES,
			KeyBits:   tpm2.NewTPMUSymKeyBits(tpm2.TPMAlgAES, tpm2.TPMKeyBits(8*len(inner))),
			Mode:      tpm2.NewTPMUSymMode(tpm2.TPMAlgAES, tpm2.TPMAlgCFB),
		},
	}.Execute(t.t)
	if err != nil {
		return blobError("import the DPS ID key", err,
			"the duplicate does not match this TPM's SRK or the key's public area, or it is corrupt")
	}
	if err := ctxError(ctx, op); err != nil {
		return err
	}
	ld, err := tpm2.Load{ParentHandle: srkAuth, InPrivate: imp.OutPrivate, InPublic: public}.Execute(t.t)
	if err != nil {
		return blobError("load the DPS ID key", err, "the key's public and private parts do not match")
	}
	perr := t.persistDPSKey(ctx, op, tpm2.NamedHandle{Handle: ld.ObjectHandle, Name: ld.Name})
	// The transient goes whatever happened; a flush failure matters only
	// when all else went well.
	_, ferr := tpm2.FlushContext{FlushHandle: ld.ObjectHandle}.Execute(t.t)
	if perr != nil {
		return perr
	}
	if ferr != nil {
		return tpmError("flush the transient DPS ID key", ferr)
	}
	return nil
}

// persistDPSKey evicts the key at DPSKeyHandle, if any, and persists the
// loaded key there. The caller holds t.mu.
func (t *TPM) persistDPSKey(ctx context.Context, op string, loaded tpm2.NamedHandle) error {
	if err := ctxError(ctx, op); err != nil {
		return err
	}
	owner := tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)}
	rp, err := tpm2.ReadPublic{ObjectHandle: DPSKeyHandle}.Execute(t.t)
	switch {
	case err == nil:
		if _, err := (tpm2.EvictControl{
			Auth:             owner,
			ObjectHandle:     tpm2.NamedHandle{Handle: DPSKeyHandle, Name: rp.Name},
			PersistentHandle: DPSKeyHandle,
		}).Execute(t.t); err != nil {
			return tpmError(fmt.Sprintf("evict the old DPS ID key at 0x%08X", uint32(DPSKeyHandle)), err)
		}
	case !errors.Is(err, tpm2.TPMRCHandle):
		return tpmError(fmt.Sprintf("read 0x%08X", uint32(DPSKeyHandle)), err)
	}
	// No ctx check here: the old key is gone, so the new one goes in.
	if _, err := (tpm2.EvictControl{
		Auth:             owner,
		ObjectHandle:     loaded,
		PersistentHandle: DPSKeyHandle,
	}).Execute(t.t); err != nil {
		return tpmError(fmt.Sprintf("persist the DPS ID key at 0x%08X", uint32(DPSKeyHandle)), err)
	}
	return nil
}

// readName returns the name of the persistent object at h. The caller
// holds t.mu.
func (t *TPM) readName(ctx context.Context, op string, h tpm2.TPMHandle, what string) (tpm2.TPM2BName, error) {
	if err := ctxError(ctx, op); err != nil {
		return tpm2.TPM2BName{}, err
	}
	rp, err := tpm2.ReadPublic{ObjectHandle: h}.Execute(t.t)
	if errors.Is(err, tpm2.TPMRCHandle) {
		return tpm2.TPM2BName{}, station.Errorf(op, station.KindNotFound,
			"no %s at 0x%08X: read the device's %s first (hsm creates it), then register again", what, uint32(h), what)
	}
	if err != nil {
		return tpm2.TPM2BName{}, tpmError(fmt.Sprintf("read %s at 0x%08X", what, uint32(h)), err)
	}
	return rp.Name, nil
}

// blobError classifies the TPM's refusal of a blob: authorization failures
// and busy TPMs as tpmError does; any other refusal means the blob does not
// fit this TPM (Invalid), explained by why.
func blobError(op string, err error, why string) error {
	var rc tpm2.TPMRC
	if errors.As(err, &rc) && !rc.IsWarning() && station.KindOf(tpmError(op, err)) == station.KindInvalid {
		return station.Errorf(op, station.KindInvalid, "the TPM refused the DPS activation blob (%w): %s", err, why)
	}
	return tpmError(op, err)
}

// HMAC computes, inside the TPM, the HMAC of data with the DPS ID key at
// DPSKeyHandle (imported by ActivateDPS), using the hash of the key's
// scheme (SHA-256 for DPS). This is how a TPM device signs its SAS tokens;
// the key never leaves the TPM. Data longer than 1024 bytes goes through an
// HMAC sequence. The TPM is held for the whole computation.
// Kinds: NotFound (no ID key: activate first), Invalid, Unauthorized,
// Unavailable.
func (t *TPM) HMAC(ctx context.Context, data []byte) ([]byte, error) {
	const op = "HMAC with the DPS ID key"
	if err := t.lock(op); err != nil {
		return nil, err
	}
	defer t.mu.Unlock()
	if err := ctxError(ctx, op); err != nil {
		return nil, err
	}
	rp, err := tpm2.ReadPublic{ObjectHandle: DPSKeyHandle}.Execute(t.t)
	if errors.Is(err, tpm2.TPMRCHandle) {
		return nil, station.Errorf(op, station.KindNotFound,
			"no DPS ID key at 0x%08X: activate the blob of the DPS TPM challenge first", uint32(DPSKeyHandle))
	}
	if err != nil {
		return nil, tpmError(op, err)
	}
	pub, err := rp.OutPublic.Contents()
	if err != nil {
		return nil, station.E(op, station.KindInvalid, err)
	}
	hash, err := idKeyHash(tpm2.Marshal(pub))
	if err != nil {
		return nil, station.Errorf(op, station.KindInvalid,
			"0x%08X does not hold a DPS ID key: %w: activate the blob of the DPS TPM challenge", uint32(DPSKeyHandle), err)
	}
	key := tpm2.NamedHandle{Handle: DPSKeyHandle, Name: rp.Name}

	if len(data) <= hmacChunk {
		if err := ctxError(ctx, op); err != nil {
			return nil, err
		}
		rsp, err := tpm2.Hmac{
			Handle:  tpm2.AuthHandle{Handle: key.Handle, Name: key.Name, Auth: tpm2.PasswordAuth(nil)},
			Buffer:  tpm2.TPM2BMaxBuffer{Buffer: data},
			HashAlg: hash,
		}.Execute(t.t)
		if err != nil {
			return nil, tpmError(op, err)
		}
		return rsp.OutHMAC.Buffer, nil
	}

	if err := ctxError(ctx, op); err != nil {
		return nil, err
	}
	st, err := tpm2.HmacStart{
		Handle:  tpm2.AuthHandle{Handle: key.Handle, Name: key.Name, Auth: tpm2.PasswordAuth(nil)},
		HashAlg: hash,
	}.Execute(t.t)
	if err != nil {
		return nil, tpmError(op, err)
	}
	seq := tpm2.AuthHandle{Handle: st.SequenceHandle, Auth: tpm2.PasswordAuth(nil)}
	done := false
	defer func() {
		if !done { // a completed sequence is flushed by the TPM
			_, _ = tpm2.FlushContext{FlushHandle: st.SequenceHandle}.Execute(t.t)
		}
	}()
	for len(data) > hmacChunk {
		if err := ctxError(ctx, op); err != nil {
			return nil, err
		}
		if _, err := (tpm2.SequenceUpdate{
			SequenceHandle: seq,
			Buffer:         tpm2.TPM2BMaxBuffer{Buffer: data[:hmacChunk]},
		}).Execute(t.t); err != nil {
			return nil, tpmError(op, err)
		}
		data = data[hmacChunk:]
	}
	if err := ctxError(ctx, op); err != nil {
		return nil, err
	}
	rsp, err := tpm2.SequenceComplete{
		SequenceHandle: seq,
		Buffer:         tpm2.TPM2BMaxBuffer{Buffer: data},
		Hierarchy:      tpm2.TPMRHNull,
	}.Execute(t.t)
	if err != nil {
		return nil, tpmError(op, err)
	}
	done = true
	return rsp.Result.Buffer, nil
}
