package hsm

import (
	"context"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/kilnworks/kiln/station"
)

// tpmError gives err, returned by a TPM command run for op, its Kind: the
// retry layer and the link classify transport errors already; a TPM
// response code is an authorization failure (Unauthorized), a warning
// (Unavailable) or a refusal (Invalid); anything else is an answer go-tpm
// could not parse (Invalid).
func tpmError(op string, err error) error {
	if err == nil {
		return nil
	}
	var se *station.Error
	if errors.As(err, &se) && station.KindOf(err) != station.KindOther {
		return &station.Error{Op: op, Kind: station.KindOf(err), Err: err}
	}
	var rc tpm2.TPMRC
	if errors.As(err, &rc) {
		switch {
		case errors.Is(rc, tpm2.TPMRCLockout):
			return station.Errorf(op, station.KindUnauthorized,
				"%w: the TPM is in dictionary-attack lockout; wait for the lockout to expire or reset it with the lockout password", err)
		case errors.Is(rc, tpm2.TPMRCBadAuth), errors.Is(rc, tpm2.TPMRCAuthFail),
			errors.Is(rc, tpm2.TPMRCAuthMissing), errors.Is(rc, tpm2.TPMRCPolicyFail),
			errors.Is(rc, tpm2.TPMRCNVAuthorization), errors.Is(rc, tpm2.TPMRCAuthUnavailable):
			return station.Errorf(op, station.KindUnauthorized,
				"%w: the TPM refused the authorization; Kiln uses the empty owner and endorsement passwords, so clear the hierarchy passwords on this device", err)
		case rc.IsWarning():
			return station.Errorf(op, station.KindUnavailable, "%w: the TPM is busy or out of resources; try again", err)
		}
		return station.Errorf(op, station.KindInvalid, "TPM refused the command: %w", err)
	}
	return station.Errorf(op, station.KindInvalid, "malformed TPM response: %w", err)
}

// ctxError reports a done ctx as the reason op stopped.
func ctxError(ctx context.Context, op string) error {
	if err := ctx.Err(); err != nil {
		return station.E(op, station.KindUnavailable, fmt.Errorf("stopped between TPM commands: %w", err))
	}
	return nil
}
