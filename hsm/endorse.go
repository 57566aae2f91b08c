package hsm

import (
	"context"
	"crypto/x509"

	"github.com/google/go-tpm/tpm2/transport"
	"github.com/kilnworks/kiln/station"
)

// Endorsement reads the TPM's endorsement identity: the EK and the SRK
// (each created and persisted when absent) and the EK certificate (nil
// when the TPM has none). On a provisioned TPM that is three commands plus
// one NV_Read per KiB of certificate. Kinds: Conflict, Unauthorized,
// Unavailable, Invalid.
func (t *TPM) Endorsement(ctx context.Context) (*station.Endorsement, error) {
	const op = "read endorsement"
	if err := t.lock(op); err != nil {
		return nil, err
	}
	defer t.mu.Unlock()
	ek, err := t.persistent(ctx, "read EK", EKHandle, tpmRHEndorsement, ekTemplate, "EK")
	if err != nil {
		return nil, err
	}
	srk, err := t.persistent(ctx, "read SRK", SRKHandle, tpmRHOwner, srkTemplate, "SRK")
	if err != nil {
		return nil, err
	}
	cert, err := t.readNV(ctx, "read EK certificate", EKCertIndex)
	if err != nil {
		return nil, err
	}
	der, err := x509.MarshalPKIXPublicKey(ek.PublicKey)
	if err != nil {
		return nil, station.Errorf(op, station.KindInvalid, "EK public key cannot be encoded: %w", err)
	}
	return &station.Endorsement{
		EKPublic:   ek.Public,
		EKKeyDER:   der,
		SRKPublic:  srk.Public,
		EKCert:     cert,
		EKCreated:  ek.Created,
		SRKCreated: srk.Created,
	}, nil
}

// OverLink returns a transport that carries each TPM command over the DUT
// link l (station.Link.TPM) under ctx. It keeps ctx: use it for one
// operation only.
func OverLink(ctx context.Context, l station.Link) transport.TPM {
	return linkTransport{ctx: ctx, l: l}
}

type linkTransport struct {
	ctx context.Context
	l   station.Link
}

func (lt linkTransport) Send(cmd []byte) ([]byte, error) { return lt.l.TPM(lt.ctx, cmd) }

// Endorser reads a DUT's endorsement through its link's TPM passthrough.
// The zero value is ready to use.
type Endorser struct{}

var _ station.Endorser = Endorser{}

// Endorsement implements station.Endorser: it runs (*TPM).Endorsement on
// the DUT's TPM through l. Kinds: as (*TPM).Endorsement, and NotFound when
// the DUT has no TPM.
func (Endorser) Endorsement(ctx context.Context, l station.Link) (*station.Endorsement, error) {
	return New(OverLink(ctx, l)).Endorsement(ctx)
}
