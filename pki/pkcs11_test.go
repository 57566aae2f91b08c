package pki_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/kilnworks/kiln/pki"
	"github.com/kilnworks/kiln/station"
)

const softhsmModule = "/usr/lib/softhsm/libsofthsm2.so"

// softhsmToken initialises a fresh softhsm2 token in a temp dir and returns
// its PKCS #11 URI without the PIN.
func softhsmToken(t *testing.T) string {
	t.Helper()
	util, err := exec.LookPath("softhsm2-util")
	if err != nil {
		t.Skip("softhsm2-util not found: install the softhsm2 package (apt-get install softhsm2) to run the PKCS #11 test")
	}
	if _, err := os.Stat(softhsmModule); err != nil {
		t.Skipf("%s not found: install the softhsm2 package to run the PKCS #11 test", softhsmModule)
	}
	dir := t.TempDir()
	conf := filepath.Join(dir, "softhsm2.conf")
	if err := os.Mkdir(filepath.Join(dir, "tokens"), 0o700); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(conf, []byte("directories.tokendir = "+filepath.Join(dir, "tokens")+"\nobjectstore.backend = file\nlog.level = ERROR\n"), 0o600)
	t.Setenv("SOFTHSM2_CONF", conf)
	out, err := exec.Command(util, "--init-token", "--free", "--label", "kiln", "--so-pin", "0000", "--pin", "1234").CombinedOutput()
	if err != nil {
		t.Fatalf("softhsm2-util --init-token: %v\n%s", err, out)
	}
	return "pkcs11:module-path=" + softhsmModule + ";token=kiln"
}

func TestPKCS11SoftHSM(t *testing.T) {
	uri := softhsmToken(t)
	dir := t.TempDir()

	keys, err := pki.OpenPKCS11(t.Context(), uri+"?pin-value=1234")
	if err != nil {
		t.Fatal(err)
	}
	ca := newCA(t, pki.Config{Dir: dir, Keys: keys})
	leaf, err := ca.Issue(t.Context(), makeCSR(t, deviceKey(t, pki.ECDSAP256), "unit-hsm"), pki.IssueRequest{RegistrationID: "unit-hsm"})
	if err != nil {
		t.Fatal(err)
	}
	verifyChain(t, leaf, ca.Root())
	ca.Close()

	// The keys stayed in the token: nothing but certificates and the log on disk.
	files, _ := filepath.Glob(filepath.Join(dir, "*.key"))
	if len(files) != 0 {
		t.Errorf("key files on disk with a PKCS #11 store: %v", files)
	}
	_, err = keys.CreateKey(t.Context(), pki.IntermediateKey, pki.ECDSAP256)
	wantKind(t, err, station.KindConflict, "already holds")
	_, err = keys.Signer(t.Context(), "nonexistent")
	wantKind(t, err, station.KindNotFound, "holds no")
	if err := keys.Close(); err != nil {
		t.Fatal(err)
	}
	if err := keys.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}

	// Reopened from the token, it is the same CA.
	keys2, err := pki.OpenPKCS11(t.Context(), uri+"?pin-value=1234")
	if err != nil {
		t.Fatal(err)
	}
	defer keys2.Close()
	ca2 := newCA(t, pki.Config{Dir: dir, Keys: keys2})
	if !ca2.Intermediate().Equal(ca.Intermediate()) {
		t.Error("reopened CA has another intermediate")
	}
	leaf, err = ca2.Issue(t.Context(), makeCSR(t, deviceKey(t, pki.ECDSAP256), "unit-hsm2"), pki.IssueRequest{RegistrationID: "unit-hsm2"})
	if err != nil {
		t.Fatal(err)
	}
	verifyChain(t, leaf, ca.Root())
}

func TestPKCS11WrongPIN(t *testing.T) {
	uri := softhsmToken(t)
	_, err := pki.OpenPKCS11(t.Context(), uri+"?pin-value=9999")
	wantKind(t, err, station.KindUnauthorized, "PIN")
}
