package hsm

import (
	"context"
	"encoding/asn1"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/kilnworks/kiln/station"
)

// nvChunk is the NV_Read size tried first: TPM_PT_NV_BUFFER_MAX of the
// reference TPM and swtpm. A TPM that refuses it is asked for its own
// maximum once.
const nvChunk = 1024

// EKCert returns the RSA EK certificate from NV index 0x01C00002, DER,
// without the padding some makers write after it. It returns (nil, nil)
// when the index does not exist. It reads with the owner's (empty)
// authorization, or the index's own when only that may read it.
// Kinds: Unauthorized, Unavailable, Invalid.
func (t *TPM) EKCert(ctx context.Context) ([]byte, error) {
	const op = "read EK certificate"
	if err := t.lock(op); err != nil {
		return nil, err
	}
	defer t.mu.Unlock()
	return t.readNV(ctx, op, EKCertIndex)
}

func (t *TPM) readNV(ctx context.Context, op string, index tpm2.TPMHandle) ([]byte, error) {
	if err := ctxError(ctx, op); err != nil {
		return nil, err
	}
	rp, err := tpm2.NVReadPublic{NVIndex: index}.Execute(t.t)
	if errors.Is(err, tpm2.TPMRCHandle) {
		return nil, nil
	}
	if err != nil {
		return nil, tpmError(op, err)
	}
	pub, err := rp.NVPublic.Contents()
	if err != nil {
		return nil, tpmError(op, err)
	}
	nv := tpm2.NamedHandle{Handle: index, Name: rp.NVName}
	var auth tpm2.AuthHandle
	switch a := pub.Attributes; {
	case a.OwnerRead:
		auth = tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)}
	case a.AuthRead:
		auth = tpm2.AuthHandle{Handle: index, Name: rp.NVName, Auth: tpm2.PasswordAuth(nil)}
	default:
		return nil, station.Errorf(op, station.KindUnauthorized,
			"NV index 0x%08X may be read by the platform or a policy only; Kiln cannot read it on this device", uint32(index))
	}
	size := int(pub.DataSize)
	data := make([]byte, 0, size)
	for len(data) < size {
		if err := ctxError(ctx, op); err != nil {
			return nil, err
		}
		chunk := nvChunk
		if t.nvMax > 0 {
			chunk = t.nvMax
		}
		n := min(chunk, size-len(data))
		rsp, err := tpm2.NVRead{AuthHandle: auth, NVIndex: nv, Size: uint16(n), Offset: uint16(len(data))}.Execute(t.t)
		if err != nil && t.nvMax == 0 && n > 64 && (errors.Is(err, tpm2.TPMRCValue) || errors.Is(err, tpm2.TPMRCSize)) {
			// The TPM's NV buffer is smaller than nvChunk: ask it, and go on.
			if t.nvMax, err = t.nvBufferMax(); err != nil {
				return nil, tpmError(op, err)
			}
			continue
		}
		if err != nil {
			return nil, tpmError(op, err)
		}
		if len(rsp.Data.Buffer) == 0 || len(rsp.Data.Buffer) > n {
			return nil, station.Errorf(op, station.KindInvalid, "NV_Read of %d bytes returned %d", n, len(rsp.Data.Buffer))
		}
		data = append(data, rsp.Data.Buffer...)
	}
	return trimDER(data), nil
}

// nvBufferMax asks the TPM for TPM_PT_NV_BUFFER_MAX.
func (t *TPM) nvBufferMax() (int, error) {
	rsp, err := tpm2.GetCapability{
		Capability:    tpm2.TPMCapTPMProperties,
		Property:      uint32(tpm2.TPMPTNVBufferMax),
		PropertyCount: 1,
	}.Execute(t.t)
	if err != nil {
		return 0, err
	}
	props, err := rsp.CapabilityData.Data.TPMProperties()
	if err != nil {
		return 0, err
	}
	if len(props.TPMProperty) == 0 || props.TPMProperty[0].Property != tpm2.TPMPTNVBufferMax || props.TPMProperty[0].Value < 64 {
		return 0, fmt.Errorf("TPM does not report a usable TPM_PT_NV_BUFFER_MAX")
	}
	return int(min(props.TPMProperty[0].Value, nvChunk)), nil
}

// trimDER cuts b to the length of the DER element it starts with, when it
// is one and b is longer; makers pad certificates to the NV size.
func trimDER(b []byte) []byte {
	var v asn1.RawValue
	rest, err := asn1.Unmarshal(b, &v)
	if err != nil || len(rest) == 0 {
		return b
	}
	return b[:len(b)-len(rest)]
}
