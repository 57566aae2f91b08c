package main

import (
	"context"
	"crypto/x509"
	"fmt"
	"strings"

	"github.com/google/go-tpm/tpm2/transport"
	"github.com/kilnworks/kiln/hsm"
	"github.com/kilnworks/kiln/hsm/tpmsim"
	"github.com/kilnworks/kiln/station"
)

// openTPM opens a TPM by spec: "sim" (the in-process simulator), swtpm:HOST:PORT,
// swtpm:unix:PATH, or a device path such as /dev/tpmrm0.
func openTPM(spec string) (*hsm.TPM, error) {
	if spec == "sim" {
		t, err := tpmsim.Open()
		if err != nil {
			return nil, err
		}
		return hsm.New(t), nil
	}
	return hsm.Open(spec)
}

// openTPMTransport is openTPM for callers that need the bare transport (the agent).
func openTPMTransport(spec string) (transport.TPMCloser, error) {
	if spec == "sim" {
		return tpmsim.Open()
	}
	return hsm.Open(spec)
}

func runTPM(ctx context.Context, e *env, args []string) error {
	if len(args) == 0 || args[0] != "info" {
		return usagef("say info: kiln tpm info --tpm sim|swtpm:HOST:PORT|swtpm:unix:PATH|/dev/tpmrm0 [--roots DIR] [--json]")
	}
	c, err := loadConfig(e)
	if err != nil {
		return err
	}
	fs := newFlags(e, "tpm info")
	spec := fs.String("tpm", "/dev/tpmrm0", "the TPM: sim, swtpm:HOST:PORT, swtpm:unix:PATH or a device path")
	fs.StringVar(&c.EKRoots, "roots", c.EKRoots, "folder of trusted TPM manufacturer roots and intermediates (PEM)")
	asJSON := fs.Bool("json", false, "print JSON")
	if err := parse(fs, args[1:], false); err != nil {
		return err
	}
	t, err := openTPM(*spec)
	if err != nil {
		return err
	}
	defer t.Close()
	end, err := t.Endorsement(ctx)
	if err != nil {
		return err
	}
	info := tpmInfo{
		TPM:            *spec,
		EKSHA256:       end.EKHash(),
		RegistrationID: station.RegistrationIDFromEK(end.EKPublic),
		EKCreated:      end.EKCreated,
		SRKCreated:     end.SRKCreated,
		EKPublic:       end.EKPublic,
		SRKPublic:      end.SRKPublic,
		EKCert:         end.EKCert,
		Roots:          c.EKRoots,
	}
	if end.EKCert != nil {
		if cert, perr := x509.ParseCertificate(end.EKCert); perr == nil {
			info.CertSubject, info.CertIssuer = cert.Subject.String(), cert.Issuer.String()
			info.CertNotAfter = cert.NotAfter.UTC().Format("2006-01-02")
		}
	}
	v, err := c.verifier()
	switch {
	case end.EKCert == nil:
		info.Validation = "not possible: the TPM holds no EK certificate"
	case err != nil:
		info.Validation = "not checked: " + err.Error()
	default:
		verr := v.VerifyEKCert(ctx, end)
		switch {
		case verr == nil:
			info.Validation = "ok: chains to a trusted root and matches the EK"
		case station.KindOf(verr) == station.KindNotFound:
			info.Validation = "not checked: " + verr.Error()
		default:
			info.Validation = "FAIL: " + verr.Error()
		}
	}
	if *asJSON {
		return writeJSON(e, info)
	}
	w := e.stdout
	fmt.Fprintf(w, "TPM            %s\n", info.TPM)
	fmt.Fprintf(w, "EK sha256      %s%s\n", info.EKSHA256, created(info.EKCreated))
	fmt.Fprintf(w, "reg. ID        %s\n", info.RegistrationID)
	fmt.Fprintf(w, "SRK            %d bytes%s\n", len(info.SRKPublic), created(info.SRKCreated))
	if info.EKCert == nil {
		fmt.Fprintln(w, "EK certificate none at NV 0x01C00002")
	} else {
		fmt.Fprintf(w, "EK certificate %d bytes, subject %q, issuer %q, valid until %s\n", len(info.EKCert), info.CertSubject, info.CertIssuer, info.CertNotAfter)
	}
	fmt.Fprintf(w, "validation     %s\n", info.Validation)
	if strings.HasPrefix(info.Validation, "FAIL") {
		return errFailed
	}
	return nil
}

func created(b bool) string {
	if b {
		return " (was absent: created and persisted now)"
	}
	return ""
}

type tpmInfo struct {
	TPM            string `json:"tpm"`
	EKSHA256       string `json:"ek_sha256"`
	RegistrationID string `json:"registration_id"`
	EKCreated      bool   `json:"ek_created"`
	SRKCreated     bool   `json:"srk_created"`
	EKPublic       []byte `json:"ek_public"`
	SRKPublic      []byte `json:"srk_public"`
	EKCert         []byte `json:"ek_cert,omitempty"`
	CertSubject    string `json:"ek_cert_subject,omitempty"`
	CertIssuer     string `json:"ek_cert_issuer,omitempty"`
	CertNotAfter   string `json:"ek_cert_not_after,omitempty"`
	Roots          string `json:"roots"`
	Validation     string `json:"validation"`
}
