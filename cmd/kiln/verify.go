package main

import (
	"bytes"
	"context"
	"encoding/pem"
	"path/filepath"
	"strings"
	"time"

	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

// dpsCheck is the station's end-to-end check against its embedded DPS:
// enrollments and registration states through the DPS service API (the
// same API Azure DPS offers), telemetry from the embedded hub.
type dpsCheck struct {
	svc *dps.ServiceClient
	hub *devserver.Hub
	dps *devserver.Server // the embedded DPS itself, which knows why it refused a device
}

var (
	_ station.Enroller         = (*dpsCheck)(nil)
	_ station.GroupEnroller    = (*dpsCheck)(nil)
	_ station.Observer         = (*dpsCheck)(nil)
	_ station.RefusalExplainer = (*dpsCheck)(nil)
)

func (d *dpsCheck) EnrollTPM(ctx context.Context, regID string, ekPublic []byte) error {
	_, err := d.svc.PutEnrollment(ctx, dps.NewTPMEnrollment(regID, ekPublic), "")
	return err
}

// EnsureX509Group creates the X.509 enrollment group, or updates it when
// its signing certificate or status is not what the station needs (a CA
// renewed or imported under a customer's root).
func (d *dpsCheck) EnsureX509Group(ctx context.Context, groupID string, signingCert []byte) error {
	pemCert := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: signingCert}))
	want := dps.AttestationMechanism{Type: dps.AttestationX509, X509: &dps.X509Attestation{
		SigningCertificates: &dps.X509Certificates{Primary: &dps.X509CertificateWithInfo{Certificate: pemCert}}}}
	return d.ensureGroup(ctx, groupID, want, func(g *dps.EnrollmentGroup) bool {
		x := g.Attestation.X509
		if x == nil || x.SigningCertificates == nil || x.SigningCertificates.Primary == nil {
			return false
		}
		b, _ := pem.Decode([]byte(x.SigningCertificates.Primary.Certificate))
		return b != nil && bytes.Equal(b.Bytes, signingCert)
	})
}

// EnsureSymKeyGroup creates the symmetric-key enrollment group, or updates
// it when its key or status is not the station's.
func (d *dpsCheck) EnsureSymKeyGroup(ctx context.Context, g *station.SymKeyGroup) error {
	key := dps.EncodeKey(g.Key)
	want := dps.AttestationMechanism{Type: dps.AttestationSymmetricKey, SymmetricKey: &dps.SymmetricKeyAttestation{PrimaryKey: key, SecondaryKey: key}}
	return d.ensureGroup(ctx, g.ID, want, func(got *dps.EnrollmentGroup) bool {
		sk := got.Attestation.SymmetricKey
		return sk != nil && sk.PrimaryKey == key
	})
}

func (d *dpsCheck) ensureGroup(ctx context.Context, groupID string, want dps.AttestationMechanism, same func(*dps.EnrollmentGroup) bool) error {
	g, err := d.svc.GetEnrollmentGroup(ctx, groupID)
	etag := ""
	switch {
	case err == nil && strings.EqualFold(g.Attestation.Type, want.Type) && same(g) && g.ProvisioningStatus != dps.ProvisioningDisabled:
		return nil
	case err == nil:
		etag = g.ETag
	case station.KindOf(err) != station.KindNotFound:
		return err
	}
	_, err = d.svc.PutEnrollmentGroup(ctx, &dps.EnrollmentGroup{EnrollmentGroupID: groupID, Attestation: want, ProvisioningStatus: dps.ProvisioningEnabled}, etag)
	return err
}

// Refusal is why the embedded DPS last refused regID, from its own record.
func (d *dpsCheck) Refusal(_ context.Context, regID string, since time.Time) (string, bool) {
	if d.dps == nil {
		return "", false
	}
	rf, ok := d.dps.LastRefusal(regID)
	if !ok || rf.At.Before(since) {
		return "", false
	}
	return rf.Reason, true
}

func (d *dpsCheck) Registration(ctx context.Context, regID string) (station.RegistrationState, error) {
	st, err := d.svc.RegistrationState(ctx, regID)
	if err != nil {
		return station.RegistrationState{}, err
	}
	return station.RegistrationState{
		Status:       st.Status,
		AssignedHub:  st.AssignedHub,
		DeviceID:     st.DeviceID,
		ErrorCode:    st.ErrorCode,
		ErrorMessage: st.ErrorMessage,
	}, nil
}

func (d *dpsCheck) WaitTelemetry(ctx context.Context, hub, deviceID string) (time.Time, error) {
	t, err := d.hub.WaitTelemetry(ctx, hub, deviceID)
	if err != nil {
		return time.Time{}, err
	}
	return t.Received, nil
}

// startEndToEnd starts the embedded DPS of the data directory and returns
// the end-to-end check that runs against it, and the DPS itself.
func startEndToEnd(ctx context.Context, e *env, c *config) (*station.EndToEnd, *embeddedDPS, func(), error) {
	d, err := startEmbeddedDPS(ctx, filepath.Join(c.Home, "devserver"), dpsOptions{addr: "127.0.0.1:0", hubAddr: "127.0.0.1:0", retryAfter: time.Second, quotas: devserver.NoQuotas()}, e.logger())
	if err != nil {
		return nil, nil, nil, err
	}
	svc, err := d.ServiceClient()
	if err != nil {
		d.Close()
		return nil, nil, nil, err
	}
	check := &dpsCheck{svc: svc, hub: d.hub, dps: d.dps}
	x := &station.EndToEnd{
		Enroller: check,
		Observer: check,
		Verify: station.DeviceConfig{
			IDScope:        d.dps.IDScope(),
			GlobalEndpoint: d.dps.Endpoint(),
			TrustBundle:    string(d.caPEM),
		},
		Production: c.Production,
	}
	return x, d, func() { d.Close() }, nil
}
