package cloudsync_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net/http"
	"testing"
	"time"

	"github.com/kilnworks/kiln/cloudsync"
	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/fixtures"
	"github.com/kilnworks/kiln/hsm"
	"github.com/kilnworks/kiln/hsm/tpmsim"
	"github.com/kilnworks/kiln/station"
)

// TestTwoPhaseWithRealTPM records a unit whose EK comes from the reference
// TPM simulator, pushes its batch disabled to the embedded devserver, and
// shows the device refused until `enable`, then registered with the
// pushed enrollment: TPM attestation against what cloudsync sent.
func TestTwoPhaseWithRealTPM(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 90*time.Second)
	defer cancel()
	sim, err := tpmsim.Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sim.Close() })
	if err := fixtures.Manufacture(ctx, sim, nil); err != nil {
		t.Fatal(err)
	}
	tpm := hsm.New(sim)
	end, err := tpm.Endorsement(ctx)
	if err != nil {
		t.Fatal(err)
	}

	emb, err := devserver.StartEmbedded(ctx, devserver.EmbeddedConfig{DataDir: t.TempDir(), RetryAfter: time.Second, Quotas: devserver.DPSQuotas()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { emb.Close() })

	s := openStation(t, t.TempDir())
	tg := &station.Target{Name: "line-dps", TrustPEM: emb.TrustPEM}
	if err := s.sealer.SealTarget(tg, emb.DPS.ServiceConnectionString()); err != nil {
		t.Fatal(err)
	}
	if err := s.store.PutTarget(ctx, tg); err != nil {
		t.Fatal(err)
	}
	b := &station.Batch{Name: "qa"}
	if err := s.store.CreateBatch(ctx, b); err != nil {
		t.Fatal(err)
	}
	u := &station.Unit{Serial: "SN-TPM-1", RegistrationID: station.RegistrationIDFromEK(end.EKPublic), Method: station.MethodTPM,
		EKHash: end.EKHash(), EKPublic: end.EKPublic, EKKeyDER: end.EKKeyDER, SRKPublic: end.SRKPublic}
	if err := s.store.RecordUnit(ctx, u); err != nil {
		t.Fatal(err)
	}
	if err := s.store.AddUnit(ctx, b.ID, u.Serial); err != nil {
		t.Fatal(err)
	}
	if err := s.store.SetBatchTarget(ctx, b.ID, tg.Name, station.EnrollmentTemplate{ProvisioningStatus: station.ProvisioningDisabled}); err != nil {
		t.Fatal(err)
	}
	if err := s.store.Transition(ctx, b.ID, station.BatchOpen, station.BatchSealed); err != nil {
		t.Fatal(err)
	}
	p := s.pusher(t, tg, cloudsync.Quota{})
	if _, err := p.Push(ctx, b.ID); err != nil {
		t.Fatal(err)
	}

	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(emb.TrustPEM)
	dc := &dps.DeviceClient{Endpoint: emb.DPS.Addr(), IDScope: emb.DPS.IDScope(),
		HTTP: &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}}}
	st, err := dc.RegisterTPM(ctx, u.RegistrationID, tpm, nil)
	if err != nil || st.Status != dps.StatusDisabled {
		t.Fatalf("before enable: state %+v, %v; want the registration refused as disabled", st, err)
	}

	if _, err := p.Enable(ctx, b.ID); err != nil {
		t.Fatal(err)
	}
	st, err = dc.RegisterTPM(ctx, u.RegistrationID, tpm, nil)
	if err != nil {
		t.Fatal(err)
	}
	if st.Status != dps.StatusAssigned || st.DeviceID == "" {
		t.Errorf("after enable: status %q, device %q; want assigned", st.Status, st.DeviceID)
	}
}
