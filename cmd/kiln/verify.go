package main

import (
	"context"
	"path/filepath"
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
}

var (
	_ station.Enroller = (*dpsCheck)(nil)
	_ station.Observer = (*dpsCheck)(nil)
)

func (d *dpsCheck) EnrollTPM(ctx context.Context, regID string, ekPublic []byte) error {
	_, err := d.svc.PutEnrollment(ctx, dps.NewTPMEnrollment(regID, ekPublic), "")
	return err
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
	check := &dpsCheck{svc: svc, hub: d.hub}
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
