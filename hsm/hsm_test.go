package hsm_test

import (
	"bytes"
	"context"
	"crypto/rsa"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-tpm/tpm2"
	"github.com/kilnworks/kiln/fixtures"
	"github.com/kilnworks/kiln/hsm"
	"github.com/kilnworks/kiln/station"
)

func attrsOf(t *testing.T, public []byte) (*tpm2.TPMTPublic, uint32) {
	t.Helper()
	_, pub, err := hsm.ParsePublic(public)
	if err != nil {
		t.Fatal(err)
	}
	return pub, binary.BigEndian.Uint32(tpm2.Marshal(pub.ObjectAttributes))
}

func TestEKAndSRKCreatedWhenAbsentThenPersisted(t *testing.T) {
	sim := openSim(t)
	ctx := t.Context()
	tpm := hsm.New(sim)

	start := time.Now()
	ek, err := tpm.EK(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ekTime := time.Since(start)
	start = time.Now()
	srk, err := tpm.SRK(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("simulator: EK created in %v, SRK created in %v", ekTime, time.Since(start))
	if !ek.Created || !srk.Created {
		t.Fatalf("Created = %v, %v on an empty TPM, want true, true", ek.Created, srk.Created)
	}
	if ek.Handle != hsm.EKHandle || srk.Handle != hsm.SRKHandle {
		t.Errorf("handles = %#x, %#x", ek.Handle, srk.Handle)
	}

	// The templates of dps-protocol.md §4.1.
	for _, tc := range []struct {
		name  string
		key   *hsm.Key
		attrs uint32
	}{{"EK", ek, 0x000300B2}, {"SRK", srk, 0x00030472}} {
		pub, attrs := attrsOf(t, tc.key.Public)
		if attrs != tc.attrs {
			t.Errorf("%s attributes = %#08x, want %#08x", tc.name, attrs, tc.attrs)
		}
		if int(binary.BigEndian.Uint16(tc.key.Public)) != len(tc.key.Public)-2 {
			t.Errorf("%s Public is not a TPM2B: size field %d, %d bytes follow", tc.name, binary.BigEndian.Uint16(tc.key.Public), len(tc.key.Public)-2)
		}
		rsaKey, ok := tc.key.PublicKey.(*rsa.PublicKey)
		if !ok || rsaKey.N.BitLen() != 2048 || rsaKey.E != 65537 {
			t.Errorf("%s key = %T, want RSA-2048 with exponent 65537", tc.name, tc.key.PublicKey)
		}
		name, err := tpm2.ObjectName(pub)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(name.Buffer, tc.key.Name) {
			t.Errorf("%s name = %x, want %x", tc.name, tc.key.Name, name.Buffer)
		}
	}

	// A second read, through a new TPM on the same device, finds them.
	again := hsm.New(sim)
	ek2, err := again.EK(ctx)
	if err != nil {
		t.Fatal(err)
	}
	srk2, err := again.SRK(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if ek2.Created || srk2.Created {
		t.Errorf("Created = %v, %v on the second read, want false, false", ek2.Created, srk2.Created)
	}
	if diff := cmp.Diff(ek.Public, ek2.Public); diff != "" {
		t.Errorf("EK changed between reads (-first +second):\n%s", diff)
	}
	if diff := cmp.Diff(srk.Public, srk2.Public); diff != "" {
		t.Errorf("SRK changed between reads (-first +second):\n%s", diff)
	}

	// No transient object was left behind.
	caps, err := tpm2.GetCapability{Capability: tpm2.TPMCapHandles, Property: 0x80000000, PropertyCount: 16}.Execute(sim)
	if err != nil {
		t.Fatal(err)
	}
	hs, _ := caps.CapabilityData.Data.Handles()
	if len(hs.Handle) != 0 {
		t.Errorf("transient handles left: %v", hs.Handle)
	}
}

func TestForeignKeyAtEKHandleIsConflictAndKept(t *testing.T) {
	sim := openSim(t)
	ctx := t.Context()
	owner := tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)}
	cp, err := tpm2.CreatePrimary{PrimaryHandle: owner, InPublic: tpm2.New2B(tpm2.ECCSRKTemplate)}.Execute(sim)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := (tpm2.EvictControl{Auth: owner, ObjectHandle: tpm2.NamedHandle{Handle: cp.ObjectHandle, Name: cp.Name}, PersistentHandle: hsm.EKHandle}).Execute(sim); err != nil {
		t.Fatal(err)
	}
	if _, err := (tpm2.FlushContext{FlushHandle: cp.ObjectHandle}).Execute(sim); err != nil {
		t.Fatal(err)
	}

	tpm := hsm.New(sim)
	_, err = tpm.EK(ctx)
	wantKind(t, err, station.KindConflict)
	if !strings.Contains(err.Error(), "never evicts") {
		t.Errorf("error %q does not say that Kiln leaves the key alone", err)
	}
	_, err = tpm.Endorsement(ctx)
	wantKind(t, err, station.KindConflict)

	rp, err := tpm2.ReadPublic{ObjectHandle: hsm.EKHandle}.Execute(sim)
	if err != nil {
		t.Fatalf("the foreign key is gone: %v", err)
	}
	if !bytes.Equal(rp.Name.Buffer, cp.Name.Buffer) {
		t.Errorf("0x81010001 holds another key now: name %x, want %x", rp.Name.Buffer, cp.Name.Buffer)
	}
}

func TestEKCertAbsent(t *testing.T) {
	sim := openSim(t)
	cert, err := hsm.New(sim).EKCert(t.Context())
	if err != nil || cert != nil {
		t.Fatalf("EKCert() = %d bytes, %v; want nil, nil on a TPM without a certificate", len(cert), err)
	}
}

func TestEKCertWrittenByManufactureReadsBack(t *testing.T) {
	sim := openSim(t)
	ctx := t.Context()
	ca, err := fixtures.NewCA("Test TPM Maker Root")
	if err != nil {
		t.Fatal(err)
	}
	if err := fixtures.Manufacture(ctx, sim, ca); err != nil {
		t.Fatal(err)
	}
	tpm := hsm.New(sim)
	cert, err := tpm.EKCert(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(cert)
	if err != nil {
		t.Fatalf("EK certificate read back does not parse: %v", err)
	}
	if err := c.CheckSignatureFrom(ca.Cert); err != nil {
		t.Errorf("EK certificate is not signed by the maker CA: %v", err)
	}
	ek, err := tpm.EK(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if ek.Created {
		t.Error("Manufacture did not persist the EK")
	}
	if !ek.PublicKey.(*rsa.PublicKey).Equal(c.PublicKey) {
		t.Error("EK certificate certifies another key than the EK")
	}
	id, err := hsm.ParseTPMSAN(sanOf(t, c))
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(fixtures.DefaultTPMIdentity, id); diff != "" {
		t.Errorf("TPM identity in the SAN (-want +got):\n%s", diff)
	}
}

func sanOf(t *testing.T, c *x509.Certificate) []byte {
	t.Helper()
	for _, e := range c.Extensions {
		if e.Id.String() == "2.5.29.17" {
			if !e.Critical {
				t.Error("SAN is not critical")
			}
			return e.Value
		}
	}
	t.Fatal("no SAN")
	return nil
}

// A maker may pad the certificate to the index size; a certificate larger
// than one NV_Read must be read in chunks.
func TestEKCertPaddedAndChunked(t *testing.T) {
	for _, tc := range []struct {
		name    string
		certLen int
		pad     int
	}{
		{"padded", 600, 200},
		{"two chunks", 1500, 0},
		{"two chunks padded", 1100, 100},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sim := openSim(t)
			der := fakeDER(tc.certLen)
			data := append(bytes.Clone(der), bytes.Repeat([]byte{0xFF}, tc.pad)...)
			if err := fixtures.WriteNV(t.Context(), sim, hsm.EKCertIndex, fixtures.EKCertAttributes, data); err != nil {
				t.Fatal(err)
			}
			got, err := hsm.New(sim).EKCert(t.Context())
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, der) {
				t.Errorf("EKCert() = %d bytes, want the %d bytes of DER without padding", len(got), len(der))
			}
		})
	}
}

// fakeDER returns a DER OCTET STRING of n bytes in all.
func fakeDER(n int) []byte {
	body := n - 4
	b := []byte{0x04, 0x82, byte(body >> 8), byte(body)}
	for i := range body {
		b = append(b, byte(i))
	}
	return b
}

func TestEndorsement(t *testing.T) {
	sim := openSim(t)
	ctx := t.Context()
	ca, err := fixtures.NewCA("Maker Root")
	if err != nil {
		t.Fatal(err)
	}
	if err := fixtures.Manufacture(ctx, sim, ca); err != nil {
		t.Fatal(err)
	}
	c := &counter{next: sim}
	start := time.Now()
	e, err := hsm.New(c).Endorsement(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("Endorsement() on a manufactured simulator: %v, %d round trips, %d bytes out, %d bytes in (%.2f s of raw bytes at 115200 8N1)",
		time.Since(start), c.sends, c.bytesOut, c.bytesIn, float64(c.bytesOut+c.bytesIn)*10/115200)
	// ReadPublic EK, ReadPublic SRK, NV_ReadPublic, one NV_Read.
	wantCodes := []uint32{uint32(tpm2.TPMCCReadPublic), uint32(tpm2.TPMCCReadPublic), uint32(tpm2.TPMCCNVReadPublic), uint32(tpm2.TPMCCNVRead)}
	if diff := cmp.Diff(wantCodes, c.commandCodes); diff != "" {
		t.Errorf("commands sent (-want +got):\n%s", diff)
	}
	if e.EKCreated || e.SRKCreated {
		t.Errorf("EKCreated, SRKCreated = %v, %v after Manufacture", e.EKCreated, e.SRKCreated)
	}
	key, err := x509.ParsePKIXPublicKey(e.EKKeyDER)
	if err != nil {
		t.Fatal(err)
	}
	ekKey, _, err := hsm.ParsePublic(e.EKPublic)
	if err != nil {
		t.Fatal(err)
	}
	if !key.(*rsa.PublicKey).Equal(ekKey) {
		t.Error("EKKeyDER is not the key of EKPublic")
	}
	if _, _, err := hsm.ParsePublic(e.SRKPublic); err != nil {
		t.Errorf("SRKPublic: %v", err)
	}
	if bytes.Equal(e.EKPublic, e.SRKPublic) {
		t.Error("EK and SRK are the same")
	}
	roots := rootsWith(t, ca)
	if err := roots.VerifyEKCert(ctx, e); err != nil {
		t.Errorf("VerifyEKCert: %v", err)
	}

	// Through the DUT link, the Endorser reads the same.
	link := &simLink{tpm: sim}
	viaLink, err := hsm.Endorser{}.Endorsement(ctx, link)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(e, viaLink); diff != "" {
		t.Errorf("Endorsement through the link differs (-direct +link):\n%s", diff)
	}
	if link.stats.Requests != 4 {
		t.Errorf("link carried %d TPM commands, want 4", link.stats.Requests)
	}
}

func TestEndorsementCreatesOnEmptyTPM(t *testing.T) {
	sim := openSim(t)
	c := &counter{next: sim}
	start := time.Now()
	e, err := hsm.New(c).Endorsement(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("Endorsement() on an empty simulator (creates EK and SRK): %v, %d round trips, %d bytes out, %d bytes in",
		time.Since(start), c.sends, c.bytesOut, c.bytesIn)
	if !e.EKCreated || !e.SRKCreated || e.EKCert != nil {
		t.Errorf("EKCreated, SRKCreated, EKCert = %v, %v, %d bytes; want true, true, none", e.EKCreated, e.SRKCreated, len(e.EKCert))
	}
	err = rootsWith(t, mustCA(t, "Any Root")).VerifyEKCert(t.Context(), e)
	wantKind(t, err, station.KindNotFound)
}

func TestEndorsementStopsWhenContextIsDone(t *testing.T) {
	sim := openSim(t)
	ctx, cancel := context.WithCancel(t.Context())
	c := &counter{next: sim}
	link := &simLink{tpm: c}
	cancel()
	_, err := hsm.Endorser{}.Endorsement(ctx, link)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("error = %v, want context.Canceled", err)
	}
	if c.sends != 0 {
		t.Errorf("%d commands sent after cancel", c.sends)
	}
}

func TestOpenErrors(t *testing.T) {
	for _, tc := range []struct {
		spec string
		want station.Kind
		says string
	}{
		{"sim", station.KindInvalid, "tpmsim"},
		{"/dev/no-such-tpm", station.KindNotFound, "no TPM at"},
		{"swtpm:127.0.0.1:1", station.KindUnavailable, "swtpm"},
		{"swtpm:127.0.0.1", station.KindInvalid, "swtpm:HOST:PORT"},
		{"swtpm:unix:/no/such/socket", station.KindNotFound, "no TPM at"},
		{"tpm0", station.KindInvalid, "/dev/tpmrm0"},
	} {
		t.Run(tc.spec, func(t *testing.T) {
			tpm, err := hsm.Open(tc.spec)
			if err == nil {
				_ = tpm.Close()
				t.Fatal("Open succeeded")
			}
			wantKind(t, err, tc.want)
			if !strings.Contains(err.Error(), tc.says) {
				t.Errorf("error %q does not mention %q", err, tc.says)
			}
		})
	}
}

func TestCloseIsIdempotent(t *testing.T) {
	sim := openSim(t)
	tpm := hsm.New(sim)
	if err := tpm.Close(); err != nil {
		t.Fatal(err)
	}
	if err := tpm.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	_, err := tpm.EK(t.Context())
	wantKind(t, err, station.KindInvalid)
	// The simulator itself was closed: commands to it fail.
	if _, err := (tpm2.GetRandom{BytesRequested: 8}).Execute(sim); err == nil {
		t.Error("the simulator still answers after Close")
	}
}
