package hsm_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kilnworks/kiln/fixtures"
	"github.com/kilnworks/kiln/hsm"
	"github.com/kilnworks/kiln/station"
)

// endorsementFor returns an endorsement whose EK is a fresh software RSA
// key, certified by issuer.
func endorsementFor(t *testing.T, issuer *fixtures.CA) (*station.Endorsement, *rsa.PublicKey) {
	t.Helper()
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := issuer.IssueEKCert(&k.PublicKey, hsm.TPMIdentity{})
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKIXPublicKey(&k.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	return &station.Endorsement{EKKeyDER: der, EKCert: cert}, &k.PublicKey
}

func TestVerifyEKCert(t *testing.T) {
	root := mustCA(t, "Maker Root CA")
	inter, err := root.NewIntermediate("Maker EK CA 7")
	if err != nil {
		t.Fatal(err)
	}
	good, _ := endorsementFor(t, inter)
	other, _ := endorsementFor(t, inter)

	// The root and its intermediate in one PEM file, and another maker's root.
	dir := t.TempDir()
	pem, err := os.ReadFile(must(inter.WritePEM(t.TempDir())))
	if err != nil {
		t.Fatal(err)
	}
	rootPEM, err := os.ReadFile(must(root.WritePEM(t.TempDir())))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "maker.crt"), append(rootPEM, pem...), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "other.cer"), mustCA(t, "Other Maker").Cert.Raw, 0o644); err != nil { // DER
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "README.txt"), []byte("not a certificate"), 0o644); err != nil {
		t.Fatal(err)
	}
	roots, err := hsm.LoadRoots(dir)
	if err != nil {
		t.Fatal(err)
	}

	swapped := *good
	swapped.EKKeyDER = other.EKKeyDER
	garbled := *good
	garbled.EKCert = good.EKCert[:100]

	for _, tc := range []struct {
		name string
		e    *station.Endorsement
		want station.Kind
		says string
	}{
		{"chains and matches", good, station.KindOther, ""},
		{"no certificate", &station.Endorsement{EKKeyDER: good.EKKeyDER}, station.KindNotFound, "no EK certificate"},
		{"certificate of another TPM", &swapped, station.KindUnauthorized, "belongs to another TPM"},
		{"unparseable", &garbled, station.KindInvalid, "does not parse"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := roots.VerifyEKCert(t.Context(), tc.e)
			if tc.want == station.KindOther {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			wantKind(t, err, tc.want)
			if !strings.Contains(err.Error(), tc.says) {
				t.Errorf("error %q does not say %q", err, tc.says)
			}
		})
	}

	t.Run("another maker's root", func(t *testing.T) {
		err := rootsWith(t, mustCA(t, "Stranger Root")).VerifyEKCert(t.Context(), good)
		wantKind(t, err, station.KindUnauthorized)
		for _, s := range []string{"does not chain to a trusted manufacturer root", "Maker EK CA 7", "add the manufacturer's root CA"} {
			if !strings.Contains(err.Error(), s) {
				t.Errorf("error %q does not say %q", err, s)
			}
		}
	})

	t.Run("intermediate missing", func(t *testing.T) {
		err := rootsWith(t, root).VerifyEKCert(t.Context(), good)
		wantKind(t, err, station.KindUnauthorized)
	})

	t.Run("the caller's certificate is left alone", func(t *testing.T) {
		c, err := x509.ParseCertificate(good.EKCert)
		if err != nil {
			t.Fatal(err)
		}
		ek, _ := x509.ParsePKIXPublicKey(good.EKKeyDER)
		if err := roots.VerifyCert(c, ek); err != nil {
			t.Fatal(err)
		}
		if len(c.UnhandledCriticalExtensions) != 1 {
			t.Errorf("UnhandledCriticalExtensions = %v, want the SAN still there", c.UnhandledCriticalExtensions)
		}
	})
}

func TestVerifyECCEK(t *testing.T) {
	ca := mustCA(t, "ECC Maker")
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := ca.IssueEKCert(&k.PublicKey, hsm.TPMIdentity{Manufacturer: "id:49465800", Model: "SLB9670", Version: "id:00070055"})
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	roots := rootsWith(t, ca)
	if err := roots.VerifyCert(c, &k.PublicKey); err != nil {
		t.Fatal(err)
	}
	k2, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	wantKind(t, roots.VerifyCert(c, &k2.PublicKey), station.KindUnauthorized)
}

func TestLoadRootsErrors(t *testing.T) {
	_, err := hsm.LoadRoots(filepath.Join(t.TempDir(), "absent"))
	wantKind(t, err, station.KindNotFound)

	_, err = hsm.LoadRoots(t.TempDir())
	wantKind(t, err, station.KindNotFound)

	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "bad.pem"), []byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = hsm.LoadRoots(dir)
	wantKind(t, err, station.KindInvalid)
	if !strings.Contains(err.Error(), "bad.pem") {
		t.Errorf("error %q does not name the file", err)
	}
}

func must(s string, err error) string {
	if err != nil {
		panic(err)
	}
	return s
}
