package hsm_test

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"log"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/fixtures"
	"github.com/kilnworks/kiln/hsm"
	"github.com/kilnworks/kiln/hsm/tpmsim"
	"github.com/kilnworks/kiln/station"
)

// device is a manufactured simulator with its EK and SRK public areas.
type device struct {
	sim      transport.TPMCloser
	tpm      *hsm.TPM
	ek, srk  []byte
	commands *counter
}

// newDevice opens and manufactures a simulator and fails the test if the
// test leaves transient objects or sessions in it.
func newDevice(t testing.TB) *device {
	t.Helper()
	sim, err := tpmsim.Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sim.Close() })
	return manufacture(t, sim)
}

func manufacture(t testing.TB, sim transport.TPMCloser) *device {
	t.Helper()
	if err := fixtures.Manufacture(t.Context(), sim, nil); err != nil {
		t.Fatal(err)
	}
	c := &counter{next: sim}
	d := &device{sim: sim, tpm: hsm.New(c), commands: c}
	ek, err := d.tpm.EK(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	srk, err := d.tpm.SRK(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	d.ek, d.srk = ek.Public, srk.Public
	t.Cleanup(func() { checkNoLeftovers(t, sim) })
	return d
}

// foreignKeys returns the EK and SRK public areas of another simulated TPM.
// The simulator is one per process, so it is opened, read and closed first.
func foreignKeys(t *testing.T) (ek, srk []byte) {
	t.Helper()
	sim, err := tpmsim.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer sim.Close()
	if err := fixtures.Manufacture(t.Context(), sim, nil); err != nil {
		t.Fatal(err)
	}
	h := hsm.New(sim)
	e, err := h.EK(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	s, err := h.SRK(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	return e.Public, s.Public
}

// checkNoLeftovers fails t if transient objects or sessions remain.
func checkNoLeftovers(t testing.TB, tpm transport.TPM) {
	t.Helper()
	for _, first := range []tpm2.TPMHandle{0x80000000, 0x02000000, 0x03000000} {
		rsp, err := tpm2.GetCapability{Capability: tpm2.TPMCapHandles, Property: uint32(first), PropertyCount: 64}.Execute(tpm)
		if err != nil {
			t.Errorf("list handles: %v", err)
			return
		}
		hs, err := rsp.CapabilityData.Data.Handles()
		if err != nil {
			t.Errorf("list handles: %v", err)
			return
		}
		for _, h := range hs.Handle {
			if h&0xFF000000 == first {
				t.Errorf("handle 0x%08X left in the TPM", uint32(h))
			}
		}
	}
}

func hmacSHA256(key, data []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write(data)
	return m.Sum(nil)
}

func TestActivateDPSRoundTrip(t *testing.T) {
	d := newDevice(t)
	ctx := t.Context()

	act, err := dps.NewActivation(nil, d.ek, d.srk)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.tpm.ActivateDPS(ctx, act.Blob); err != nil {
		t.Fatalf("ActivateDPS: %v", err)
	}
	rp, err := tpm2.ReadPublic{ObjectHandle: hsm.DPSKeyHandle}.Execute(d.sim)
	if err != nil {
		t.Fatalf("no key persisted at 0x%08X: %v", uint32(hsm.DPSKeyHandle), err)
	}
	blob, err := hsm.ParseActivationBlob(act.Blob)
	if err != nil {
		t.Fatal(err)
	}
	if got := tpm2.Marshal(rp.OutPublic); !bytes.Equal(got[2:], blob.Public) {
		t.Errorf("persisted public area %x, want the blob's %x", got[2:], blob.Public)
	}

	for _, n := range []int{0, 1, 63, 1024, 1025, 3000} {
		data := bytes.Repeat([]byte("0ne00AB12CD%2Fregistrations%2Fdevice-1\n1767225600 "), 60)[:n]
		got, err := d.tpm.HMAC(ctx, data)
		if err != nil {
			t.Fatalf("HMAC of %d bytes: %v", n, err)
		}
		if want := hmacSHA256(act.Key, data); !bytes.Equal(got, want) {
			t.Errorf("TPM HMAC of %d bytes = %x, want HMAC-SHA256(server key) %x", n, got, want)
		}
	}

	// A second activation replaces the key at 0x81000100.
	act2, err := dps.NewActivation(nil, d.ek, d.srk)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.tpm.ActivateDPS(ctx, act2.Blob); err != nil {
		t.Fatalf("second ActivateDPS: %v", err)
	}
	data := []byte("after the final blob")
	got, err := d.tpm.HMAC(ctx, data)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, hmacSHA256(act2.Key, data)) {
		t.Error("after a second activation the TPM does not sign with the second key")
	}
	if bytes.Equal(got, hmacSHA256(act.Key, data)) {
		t.Error("after a second activation the TPM still signs with the first key")
	}
}

func TestActivateDPSCommandSequence(t *testing.T) {
	d := newDevice(t)
	act, err := dps.NewActivation(nil, d.ek, d.srk)
	if err != nil {
		t.Fatal(err)
	}
	d.commands.commandCodes = nil
	if err := d.tpm.ActivateDPS(t.Context(), act.Blob); err != nil {
		t.Fatal(err)
	}
	want := []tpm2.TPMCC{
		tpm2.TPMCCReadPublic, tpm2.TPMCCReadPublic, // EK, SRK names
		tpm2.TPMCCStartAuthSession, tpm2.TPMCCPolicySecret, tpm2.TPMCCActivateCredential,
		tpm2.TPMCCImport, tpm2.TPMCCLoad,
		tpm2.TPMCCReadPublic, // 0x81000100: empty on a fresh TPM
		tpm2.TPMCCEvictControl, tpm2.TPMCCFlushContext, tpm2.TPMCCFlushContext,
	}
	var got []tpm2.TPMCC
	for _, c := range d.commands.commandCodes {
		got = append(got, tpm2.TPMCC(c))
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("commands\n got %v\nwant %v", got, want)
	}
}

func TestActivateDPSForeignTPM(t *testing.T) {
	otherEK, otherSRK := foreignKeys(t)
	d := newDevice(t)
	ctx := t.Context()

	// A key activated earlier must survive failed activations.
	good, err := dps.NewActivation(nil, d.ek, d.srk)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.tpm.ActivateDPS(ctx, good.Blob); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		ek, srk []byte
	}{
		{"other EK and SRK", otherEK, otherSRK},
		{"other EK", otherEK, d.srk},
		{"other SRK", d.ek, otherSRK},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			act, err := dps.NewActivation(nil, tt.ek, tt.srk)
			if err != nil {
				t.Fatal(err)
			}
			err = d.tpm.ActivateDPS(ctx, act.Blob)
			wantKind(t, err, station.KindInvalid)
			t.Logf("error: %v", err)
		})
	}
	data := []byte("still the good key")
	got, err := d.tpm.HMAC(ctx, data)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, hmacSHA256(good.Key, data)) {
		t.Error("a failed activation changed the key at 0x81000100")
	}
}

// fieldOffsets returns where the contents of each of the six blob fields
// start and end.
func fieldOffsets(t *testing.T, blob []byte) [6][2]int {
	t.Helper()
	var offs [6][2]int
	p := 0
	for i := range offs {
		n := int(binary.BigEndian.Uint16(blob[p:]))
		offs[i] = [2]int{p + 2, p + 2 + n}
		p += 2 + n
	}
	if p != len(blob) {
		t.Fatalf("blob of %d bytes has fields up to %d", len(blob), p)
	}
	return offs
}

func TestActivateDPSCorruptBlob(t *testing.T) {
	d := newDevice(t)
	ctx := t.Context()
	act, err := dps.NewActivation(nil, d.ek, d.srk)
	if err != nil {
		t.Fatal(err)
	}
	offs := fieldOffsets(t, act.Blob)
	names := []string{"credential", "credential seed", "duplicate", "duplication seed", "public area"}

	type tc struct {
		name string
		blob []byte
	}
	var tests []tc
	for _, n := range []int{0, 1, 2, 53, offs[1][1], len(act.Blob) - 1} {
		tests = append(tests, tc{fmt.Sprintf("truncated to %d", n), act.Blob[:n]})
	}
	for i, name := range names {
		for _, at := range []int{offs[i][0], (offs[i][0] + offs[i][1]) / 2, offs[i][1] - 1} {
			b := bytes.Clone(act.Blob)
			b[at] ^= 0x40
			tests = append(tests, tc{fmt.Sprintf("%s byte %d flipped", name, at-offs[i][0]), b})
		}
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := d.tpm.ActivateDPS(ctx, tt.blob)
			if err == nil {
				t.Fatal("a corrupt blob was activated")
			}
			wantKind(t, err, station.KindInvalid)
		})
	}

	// encUriData is ignored, as by the SDKs: changing it changes nothing.
	b := append(bytes.Clone(act.Blob[:offs[5][0]-2]), 0, 3, 1, 2, 3)
	if err := d.tpm.ActivateDPS(ctx, b); err != nil {
		t.Errorf("a blob with encUriData: %v", err)
	}
}

func TestActivateDPSCanceled(t *testing.T) {
	d := newDevice(t)
	act, err := dps.NewActivation(nil, d.ek, d.srk)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	wantKind(t, d.tpm.ActivateDPS(ctx, act.Blob), station.KindUnavailable)
	_, err = d.tpm.HMAC(ctx, []byte("x"))
	wantKind(t, err, station.KindUnavailable)

	// Cancel after n commands: every stop leaves the TPM clean (checked by
	// newDevice's cleanup).
	for n := 1; n <= 8; n++ {
		ctx, cancel := context.WithCancel(t.Context())
		c := &cancelAfter{next: d.sim, n: n, cancel: cancel}
		err := hsm.New(c).ActivateDPS(ctx, act.Blob)
		cancel()
		if err != nil {
			wantKind(t, err, station.KindUnavailable)
		}
	}
}

// cancelAfter cancels a context after n commands.
type cancelAfter struct {
	next   transport.TPM
	n      int
	cancel func()
}

func (c *cancelAfter) Send(cmd []byte) ([]byte, error) {
	rsp, err := c.next.Send(cmd)
	if c.n--; c.n == 0 {
		c.cancel()
	}
	return rsp, err
}

func TestHMACWithoutKey(t *testing.T) {
	d := newDevice(t)
	_, err := d.tpm.HMAC(t.Context(), []byte("x"))
	wantKind(t, err, station.KindNotFound)
}

func TestActivateDPSWithoutEK(t *testing.T) {
	ek, srk := foreignKeys(t) // before this test's simulator: one at a time
	sim := openSim(t)
	act, err := dps.NewActivation(nil, ek, srk)
	if err != nil {
		t.Fatal(err)
	}
	err = hsm.New(sim).ActivateDPS(t.Context(), act.Blob)
	wantKind(t, err, station.KindNotFound)
}

// A TPM device's SAS token, signed inside the TPM, verifies with the key the
// server put in the blob.
func TestDeviceSASVerifies(t *testing.T) {
	d := newDevice(t)
	ctx := t.Context()
	act, err := dps.NewActivation(nil, d.ek, d.srk)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.tpm.ActivateDPS(ctx, act.Blob); err != nil {
		t.Fatal(err)
	}
	now := time.Unix(1767225600, 0)
	resource := dps.DeviceResource("0ne00AB12CD", "device-1")
	token, err := dps.BuildSAS(ctx, resource, now.Add(time.Hour), dps.RegistrationKeyName, d.tpm.HMAC)
	if err != nil {
		t.Fatal(err)
	}
	sas, err := dps.ParseSAS(token)
	if err != nil {
		t.Fatal(err)
	}
	if err := sas.Verify(act.Key, now); err != nil {
		t.Errorf("the TPM-signed token does not verify with the server's key: %v", err)
	}
	if err := sas.MatchResource(resource); err != nil {
		t.Error(err)
	}
	other, err := dps.NewActivation(nil, d.ek, d.srk)
	if err != nil {
		t.Fatal(err)
	}
	wantKind(t, sas.Verify(other.Key, now), station.KindUnauthorized)
}

// BenchmarkActivateDPS measures the device side: the whole TPM sequence on
// the simulator.
func BenchmarkActivateDPS(b *testing.B) {
	d := newDevice(b)
	act, err := dps.NewActivation(nil, d.ek, d.srk)
	if err != nil {
		b.Fatal(err)
	}
	ctx := b.Context()
	for b.Loop() {
		if err := d.tpm.ActivateDPS(ctx, act.Blob); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkHMAC measures one SAS signature inside the simulator.
func BenchmarkHMAC(b *testing.B) {
	d := newDevice(b)
	act, err := dps.NewActivation(nil, d.ek, d.srk)
	if err != nil {
		b.Fatal(err)
	}
	ctx := b.Context()
	if err := d.tpm.ActivateDPS(ctx, act.Blob); err != nil {
		b.Fatal(err)
	}
	data := []byte("0ne00AB12CD%2Fregistrations%2Fdevice-1\n1767225600")
	for b.Loop() {
		if _, err := d.tpm.HMAC(ctx, data); err != nil {
			b.Fatal(err)
		}
	}
}

// A DPS server sends a TPM device an activation blob made for its EK and
// SRK; the device imports the key into its TPM and signs its SAS token with
// it, and the server verifies the token with the key it put in the blob.
func ExampleTPM_ActivateDPS() {
	ctx := context.Background()
	sim, err := tpmsim.Open()
	if err != nil {
		log.Fatal(err)
	}
	defer sim.Close()
	if err := fixtures.Manufacture(ctx, sim, nil); err != nil {
		log.Fatal(err)
	}
	tpm := hsm.New(sim)
	ek, err := tpm.EK(ctx)
	if err != nil {
		log.Fatal(err)
	}
	srk, err := tpm.SRK(ctx)
	if err != nil {
		log.Fatal(err)
	}

	// Server: the blob for this TPM, sent as the challenge's authenticationKey.
	act, err := dps.NewActivation(nil, ek.Public, srk.Public)
	if err != nil {
		log.Fatal(err)
	}

	// Device: activate, then sign a token inside the TPM.
	if err := tpm.ActivateDPS(ctx, act.Blob); err != nil {
		log.Fatal(err)
	}
	now := time.Now()
	token, err := dps.BuildSAS(ctx, dps.DeviceResource("0ne00AB12CD", "device-1"), now.Add(time.Hour), dps.RegistrationKeyName, tpm.HMAC)
	if err != nil {
		log.Fatal(err)
	}

	// Server: verify it.
	sas, err := dps.ParseSAS(token)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("blob bytes:", len(act.Blob))
	fmt.Println("token verifies:", sas.Verify(act.Key, now) == nil)
	// Output:
	// blob bytes: 766
	// token verifies: true
}
