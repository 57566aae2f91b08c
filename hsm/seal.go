package hsm

import (
	"context"

	"github.com/google/go-tpm/tpm2"
	"github.com/kilnworks/kiln/station"
)

// MaxSealed is the most bytes Seal takes (the TPM's MAX_SYM_DATA): enough
// for a data-encryption key, not for the data itself.
const MaxSealed = 128

// Seal seals data (1 to MaxSealed bytes, e.g. an AES key that encrypts a
// device's secrets at rest) into a TPM data object under the SRK at
// 0x81000001, creating the SRK when absent. The blob is useless outside
// this TPM; Unseal returns the data. Kinds: Invalid, Conflict (a foreign
// key at the SRK handle), Unauthorized, Unavailable.
func (t *TPM) Seal(ctx context.Context, data []byte) (*KeyBlob, error) {
	const op = "seal data in the TPM"
	if len(data) == 0 || len(data) > MaxSealed {
		return nil, station.Errorf(op, station.KindInvalid, "%d bytes: the TPM seals 1 to %d bytes", len(data), MaxSealed)
	}
	if err := t.lock(op); err != nil {
		return nil, err
	}
	defer t.mu.Unlock()
	srk, err := t.persistent(ctx, op, SRKHandle, tpmRHOwner, srkTemplate, "SRK")
	if err != nil {
		return nil, err
	}
	if err := ctxError(ctx, op); err != nil {
		return nil, err
	}
	rsp, err := tpm2.Create{
		ParentHandle: tpm2.AuthHandle{Handle: SRKHandle, Name: tpm2.TPM2BName{Buffer: srk.Name}, Auth: tpm2.PasswordAuth(nil)},
		InSensitive: tpm2.TPM2BSensitiveCreate{Sensitive: &tpm2.TPMSSensitiveCreate{
			Data: tpm2.NewTPMUSensitiveCreate(&tpm2.TPM2BSensitiveData{Buffer: data}),
		}},
		InPublic: tpm2.New2B(tpm2.TPMTPublic{
			Type:    tpm2.TPMAlgKeyedHash,
			NameAlg: tpm2.TPMAlgSHA256,
			ObjectAttributes: tpm2.TPMAObject{
				FixedTPM:     true,
				FixedParent:  true,
				UserWithAuth: true,
				NoDA:         true,
			},
			Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgKeyedHash, &tpm2.TPMSKeyedHashParms{
				Scheme: tpm2.TPMTKeyedHashScheme{Scheme: tpm2.TPMAlgNull},
			}),
		}),
	}.Execute(t.t)
	if err != nil {
		return nil, tpmError(op, err)
	}
	return &KeyBlob{Public: tpm2.Marshal(rsp.OutPublic), Private: tpm2.Marshal(rsp.OutPrivate)}, nil
}

// Unseal returns the data of a blob made by Seal in this TPM. Kinds:
// Invalid (a blob that does not parse, or that this TPM cannot load: made
// in another TPM, under another SRK, or altered), Unauthorized,
// Unavailable.
func (t *TPM) Unseal(ctx context.Context, blob KeyBlob) ([]byte, error) {
	const op = "unseal data from the TPM"
	if err := t.lock(op); err != nil {
		return nil, err
	}
	defer t.mu.Unlock()
	ld, flush, err := t.loadBlob(ctx, op, blob, "the sealed blob", "it was made in another TPM or under another SRK, or altered")
	if err != nil {
		return nil, err
	}
	defer flush()
	rsp, err := tpm2.Unseal{
		ItemHandle: tpm2.AuthHandle{Handle: ld.ObjectHandle, Name: ld.Name, Auth: tpm2.PasswordAuth(nil)},
	}.Execute(t.t)
	if err != nil {
		return nil, tpmError(op, err)
	}
	return rsp.OutData.Buffer, nil
}
