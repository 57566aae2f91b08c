package agent

import (
	"context"
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"

	"github.com/kilnworks/kiln/hsm"
	"github.com/kilnworks/kiln/link"
	"github.com/kilnworks/kiln/station"
)

// The files of the agent's identity in its data directory. key.json and
// symkey.json hold secrets: with a TPM they are encrypted (AES-256-GCM)
// under a data-encryption key sealed in the TPM (dek.tpm); without one
// they rely on their mode (0600) alone. A TPM key's private part is the
// TPM's own blob, encrypted under the SRK, whatever the file's encryption.
const (
	fileKey    = "key.json"
	fileChain  = "chain.pem"
	fileSymKey = "symkey.json"
	fileDEK    = "dek.tpm"
)

var _ link.Identity = (*Agent)(nil)

// keyRecord is the generated key as stored.
type keyRecord struct {
	Storage    station.KeyStorage `json:"storage"`
	Type       string             `json:"type"`
	TPMPublic  []byte             `json:"tpm_public,omitempty"`  // TPM2B_PUBLIC
	TPMPrivate []byte             `json:"tpm_private,omitempty"` // TPM2B_PRIVATE, encrypted under the SRK by the TPM
	PKCS8      []byte             `json:"pkcs8,omitempty"`       // a software key
}

// symRecord is the symmetric key as stored.
type symRecord struct {
	RegistrationID string `json:"registration_id"`
	Key            []byte `json:"key"`
}

// envelope is a secret file: Data is the JSON record, encrypted when Enc
// names how.
type envelope struct {
	Enc   string `json:"enc,omitempty"`
	Nonce []byte `json:"nonce,omitempty"`
	Data  []byte `json:"data"`
}

// encTPM names the encryption of a secret file under the sealed DEK.
const encTPM = "tpm-sealed-aes-256-gcm"

// GenerateKey makes a new key pair (replacing the one made before and
// forgetting its chain) and returns a CSR for it with subject CN
// req.CommonName. With storage tpm, or empty on a DUT with a TPM, the key
// is an ECDSA P-256 (or RSA-2048) signing key created in the TPM under the
// SRK: its private part never leaves the TPM. Otherwise it is a software
// key kept in the data directory. Kinds: Invalid (a key type or storage
// the agent cannot make, a CN that is not a registration ID), NotFound
// (storage tpm without a TPM), Unavailable, and those of the TPM.
func (a *Agent) GenerateKey(ctx context.Context, req station.KeyRequest) (station.GeneratedKey, error) {
	const op = "generate key"
	keyType := req.Type
	switch keyType {
	case "":
		keyType = hsm.KeyECP256
	case hsm.KeyECP256, hsm.KeyRSA2048:
	default:
		return station.GeneratedKey{}, station.Errorf(op, station.KindInvalid,
			"this agent makes %s or %s keys, not %q: set the station's key type to one of them", hsm.KeyECP256, hsm.KeyRSA2048, req.Type)
	}
	if err := station.ValidRegistrationID(req.CommonName); err != nil {
		return station.GeneratedKey{}, station.E(op, station.KindInvalid, err)
	}
	storage := req.Storage
	switch storage {
	case "":
		storage = station.KeyInSoftware
		if a.tpm != nil {
			storage = station.KeyInTPM
		}
	case station.KeyInTPM:
		if a.tpm == nil {
			return station.GeneratedKey{}, station.Errorf(op, station.KindNotFound,
				"this DUT has no TPM configured, so it cannot keep a key in one: start the agent with --tpm, or ask for storage software")
		}
	case station.KeyInSoftware:
	default:
		return station.GeneratedKey{}, station.Errorf(op, station.KindInvalid, "key storage %q is neither tpm nor software", req.Storage)
	}

	rec := keyRecord{Storage: storage, Type: keyType}
	var signer crypto.Signer
	if storage == station.KeyInTPM {
		unlock := a.lockTPM()
		blob, _, err := a.htpm.CreateSigningKey(ctx, keyType)
		unlock()
		if err != nil {
			return station.GeneratedKey{}, err
		}
		rec.TPMPublic, rec.TPMPrivate = blob.Public, blob.Private
		if signer, err = a.tpmSigner(*blob); err != nil {
			return station.GeneratedKey{}, err
		}
	} else {
		var err error
		if keyType == hsm.KeyRSA2048 {
			signer, err = rsa.GenerateKey(rand.Reader, 2048)
		} else {
			signer, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		}
		if err == nil {
			rec.PKCS8, err = x509.MarshalPKCS8PrivateKey(signer)
		}
		if err != nil {
			return station.GeneratedKey{}, station.E(op, station.KindInternal, err)
		}
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: req.CommonName}}, signer)
	if err != nil {
		if station.KindOf(err) != station.KindOther {
			return station.GeneratedKey{}, err
		}
		return station.GeneratedKey{}, station.Errorf(op, station.KindInternal, "sign the CSR: %w", err)
	}

	a.idMu.Lock()
	defer a.idMu.Unlock()
	if err := a.putSecret(ctx, fileKey, rec); err != nil {
		return station.GeneratedKey{}, err
	}
	if err := a.vault.del(fileChain); err != nil {
		return station.GeneratedKey{}, err
	}
	a.log.Info("key generated", "storage", storage, "type", keyType, "common_name", req.CommonName)
	return station.GeneratedKey{CSR: csr, Storage: storage}, nil
}

// WriteCertChain stores chain (DER, leaf first) for the generated key.
// Each certificate must parse and be signed by the next; the leaf's public
// key must be the generated key. Kinds: Invalid, Unavailable.
func (a *Agent) WriteCertChain(ctx context.Context, chain [][]byte) error {
	const op = "write certificate chain"
	if len(chain) == 0 {
		return station.Errorf(op, station.KindInvalid, "the chain is empty: write the leaf the station CA issued, then its intermediates")
	}
	certs := make([]*x509.Certificate, len(chain))
	for i, der := range chain {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return station.Errorf(op, station.KindInvalid, "certificate %d of the chain does not parse (%v): write DER certificates, leaf first", i+1, err)
		}
		certs[i] = c
	}
	for i := 0; i+1 < len(certs); i++ {
		if err := certs[i].CheckSignatureFrom(certs[i+1]); err != nil {
			return station.Errorf(op, station.KindInvalid,
				"certificate %d (%s) is not signed by certificate %d (%s): write the chain leaf first, each certificate followed by its issuer",
				i+1, certs[i].Subject.CommonName, i+2, certs[i+1].Subject.CommonName)
		}
	}
	a.idMu.Lock()
	defer a.idMu.Unlock()
	rec, ok, err := a.loadKey(ctx)
	if err != nil {
		return err
	}
	if !ok {
		return station.Errorf(op, station.KindInvalid, "no key has been generated on this DUT: run GENERATE KEY first, then have its CSR signed")
	}
	pub, err := rec.public()
	if err != nil {
		return err
	}
	if k, ok := certs[0].PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !k.Equal(pub) {
		return station.Errorf(op, station.KindInvalid,
			"the leaf (%s) is not for this DUT's key: issue it from the CSR of this DUT's latest GENERATE KEY", certs[0].Subject.CommonName)
	}
	var b []byte
	for _, der := range chain {
		b = append(b, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	}
	if err := a.vault.put(fileChain, b); err != nil {
		return err
	}
	a.log.Info("certificate chain written", "leaf", certs[0].Subject.CommonName, "certificates", len(chain), "key_storage", rec.Storage)
	return nil
}

// WriteSymmetricKey stores the DPS device key of registration ID regID.
// The key is never logged. Kinds: Invalid, Unavailable.
func (a *Agent) WriteSymmetricKey(ctx context.Context, regID string, key []byte) error {
	const op = "write symmetric key"
	if err := station.ValidRegistrationID(regID); err != nil {
		return station.E(op, station.KindInvalid, err)
	}
	if len(key) < link.MinSymKey || len(key) > link.MaxSymKey {
		return station.Errorf(op, station.KindInvalid, "a %d-byte key: DPS device keys are %d–%d bytes", len(key), link.MinSymKey, link.MaxSymKey)
	}
	a.idMu.Lock()
	defer a.idMu.Unlock()
	if err := a.putSecret(ctx, fileSymKey, symRecord{RegistrationID: regID, Key: key}); err != nil {
		return err
	}
	a.log.Info("symmetric key written", "registration_id", regID, "encrypted", a.tpm != nil)
	return nil
}

// ReadIdentity returns what the agent holds: the chain, where the key is,
// and the symmetric key's registration ID and SHA-256, never a key.
// Kinds: Invalid (a stored file is corrupt), Unavailable.
func (a *Agent) ReadIdentity(ctx context.Context) (station.DeviceIdentity, error) {
	a.idMu.Lock()
	defer a.idMu.Unlock()
	var id station.DeviceIdentity
	rec, ok, err := a.loadKey(ctx)
	if err != nil {
		return id, err
	}
	if ok {
		id.KeyStorage = rec.Storage
	}
	if id.CertChain, err = a.loadChain(); err != nil {
		return id, err
	}
	sym, ok, err := a.loadSym(ctx)
	if err != nil {
		return id, err
	}
	if ok {
		h := sha256.Sum256(sym.Key)
		id.SymKeyRegistrationID, id.SymKeySHA256 = sym.RegistrationID, hex.EncodeToString(h[:])
	}
	return id, nil
}

// tlsCertificate returns the stored chain with the generated key as a
// client certificate for DPS and the hub. Kinds: NotFound (no key or no
// chain), Invalid, Unavailable.
func (a *Agent) tlsCertificate(ctx context.Context) (tls.Certificate, error) {
	const op = "load device certificate"
	a.idMu.Lock()
	defer a.idMu.Unlock()
	rec, ok, err := a.loadKey(ctx)
	if err != nil {
		return tls.Certificate{}, err
	}
	if !ok {
		return tls.Certificate{}, station.Errorf(op, station.KindNotFound,
			"this DUT holds no generated key for X.509 attestation: the station runs GENERATE KEY and WRITE CERT CHAIN first")
	}
	chain, err := a.loadChain()
	if err != nil {
		return tls.Certificate{}, err
	}
	if len(chain) == 0 {
		return tls.Certificate{}, station.Errorf(op, station.KindNotFound,
			"this DUT has a key but no certificate chain: the station writes it (WRITE CERT CHAIN) before X.509 provisioning")
	}
	leaf, err := x509.ParseCertificate(chain[0])
	if err != nil {
		return tls.Certificate{}, station.Errorf(op, station.KindInvalid, "the stored leaf does not parse (%v): write the chain again", err)
	}
	signer, err := a.signerOf(rec)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: chain, PrivateKey: signer, Leaf: leaf}, nil
}

// symmetricKey returns the stored symmetric key for regID. Kinds: NotFound
// (none), Invalid (it is for another registration ID), Unavailable.
func (a *Agent) symmetricKey(ctx context.Context, regID string) ([]byte, error) {
	const op = "load symmetric key"
	a.idMu.Lock()
	defer a.idMu.Unlock()
	sym, ok, err := a.loadSym(ctx)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, station.Errorf(op, station.KindNotFound,
			"this DUT holds no symmetric key: the station writes it (WRITE SYMMETRIC KEY) before symmetric-key provisioning")
	}
	if sym.RegistrationID != regID {
		return nil, station.Errorf(op, station.KindInvalid,
			"the stored symmetric key is for %q, the config registers %q: write the key of this registration ID", sym.RegistrationID, regID)
	}
	return sym.Key, nil
}

// public returns the record's public key.
func (r keyRecord) public() (crypto.PublicKey, error) {
	if r.Storage == station.KeyInTPM {
		pub, _, err := hsm.ParsePublic(r.TPMPublic)
		if err != nil {
			return nil, station.Errorf("load key", station.KindInvalid, "the stored TPM key is corrupt (%v): generate the key again", err)
		}
		return pub, nil
	}
	k, err := x509.ParsePKCS8PrivateKey(r.PKCS8)
	if err != nil {
		return nil, station.Errorf("load key", station.KindInvalid, "the stored key is corrupt (%v): generate the key again", err)
	}
	return k.(crypto.Signer).Public(), nil
}

// signerOf returns the signer of a stored key: through the TPM, one
// operation at a time under the agent's TPM mutex, or in memory.
func (a *Agent) signerOf(rec keyRecord) (crypto.Signer, error) {
	if rec.Storage == station.KeyInTPM {
		if a.tpm == nil {
			return nil, station.Errorf("load key", station.KindNotFound,
				"the stored key is in a TPM, and the agent runs without one: start the agent with --tpm")
		}
		return a.tpmSigner(hsm.KeyBlob{Public: rec.TPMPublic, Private: rec.TPMPrivate})
	}
	k, err := x509.ParsePKCS8PrivateKey(rec.PKCS8)
	if err != nil {
		return nil, station.Errorf("load key", station.KindInvalid, "the stored key is corrupt (%v): generate the key again", err)
	}
	s, ok := k.(crypto.Signer)
	if !ok {
		return nil, station.Errorf("load key", station.KindInvalid, "the stored key is a %T, not a signing key: generate the key again", k)
	}
	return s, nil
}

func (a *Agent) tpmSigner(blob hsm.KeyBlob) (crypto.Signer, error) {
	s, err := a.htpm.Signer(blob)
	if err != nil {
		return nil, err
	}
	return &lockedSigner{lock: a.lockTPM, s: s}, nil
}

// lockedSigner signs with a TPM key holding the agent's TPM mutex, so that
// its load-sign-flush sequence never interleaves with passthrough.
type lockedSigner struct {
	lock func() func()
	s    *hsm.KeySigner
}

func (l *lockedSigner) Public() crypto.PublicKey { return l.s.Public() }

func (l *lockedSigner) Sign(r io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	defer l.lock()()
	return l.s.Sign(r, digest, opts)
}

// loadKey reads the key record; the caller holds idMu.
func (a *Agent) loadKey(ctx context.Context) (keyRecord, bool, error) {
	var rec keyRecord
	ok, err := a.getSecret(ctx, fileKey, &rec)
	if err == nil && ok && rec.Storage != station.KeyInTPM && rec.Storage != station.KeyInSoftware {
		err = station.Errorf("load key", station.KindInvalid, "the stored key names storage %q: generate the key again", rec.Storage)
	}
	return rec, ok && err == nil, err
}

// loadSym reads the symmetric key record; the caller holds idMu.
func (a *Agent) loadSym(ctx context.Context) (symRecord, bool, error) {
	var rec symRecord
	ok, err := a.getSecret(ctx, fileSymKey, &rec)
	return rec, ok && err == nil, err
}

// loadChain reads the stored chain, DER, leaf first; the caller holds idMu.
func (a *Agent) loadChain() ([][]byte, error) {
	b, err := a.vault.get(fileChain)
	if err != nil || b == nil {
		return nil, err
	}
	var chain [][]byte
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		chain = append(chain, blk.Bytes)
	}
	if len(chain) == 0 {
		return nil, station.Errorf("load certificate chain", station.KindInvalid, "the stored chain holds no certificate: write the chain again")
	}
	return chain, nil
}

// putSecret stores v as JSON in file name, encrypted under the sealed DEK
// when the agent has a TPM.
func (a *Agent) putSecret(ctx context.Context, name string, v any) error {
	const op = "store identity"
	plain, err := json.Marshal(v)
	if err != nil {
		return station.E(op, station.KindInternal, err)
	}
	defer clear(plain)
	env := envelope{Data: plain}
	if a.tpm != nil {
		gcm, err := a.gcm(ctx)
		if err != nil {
			return err
		}
		nonce := make([]byte, gcm.NonceSize())
		if _, err := rand.Read(nonce); err != nil {
			return station.E(op, station.KindInternal, err)
		}
		env = envelope{Enc: encTPM, Nonce: nonce, Data: gcm.Seal(nil, nonce, plain, []byte(name))}
	}
	b, err := json.Marshal(env)
	if err != nil {
		return station.E(op, station.KindInternal, err)
	}
	return a.vault.put(name, b)
}

// getSecret reads file name into v; false when there is no such file.
func (a *Agent) getSecret(ctx context.Context, name string, v any) (bool, error) {
	const op = "read identity"
	b, err := a.vault.get(name)
	if err != nil || b == nil {
		return false, err
	}
	var env envelope
	if err := json.Unmarshal(b, &env); err != nil {
		return false, station.Errorf(op, station.KindInvalid, "%s is corrupt (%v): write the identity again", name, err)
	}
	plain := env.Data
	switch env.Enc {
	case "":
	case encTPM:
		if a.tpm == nil {
			return false, station.Errorf(op, station.KindNotFound, "%s is encrypted by the DUT's TPM, and the agent runs without one: start the agent with --tpm", name)
		}
		gcm, err := a.gcm(ctx)
		if err != nil {
			return false, err
		}
		if len(env.Nonce) != gcm.NonceSize() {
			return false, station.Errorf(op, station.KindInvalid, "%s is corrupt (a %d-byte nonce): write the identity again", name, len(env.Nonce))
		}
		if plain, err = gcm.Open(nil, env.Nonce, env.Data, []byte(name)); err != nil {
			return false, station.Errorf(op, station.KindInvalid, "%s does not decrypt with the key sealed in this TPM (altered, or from another device): write the identity again", name)
		}
		defer clear(plain)
	default:
		return false, station.Errorf(op, station.KindInvalid, "%s is encrypted as %q, which this agent does not know: update the agent", name, env.Enc)
	}
	if err := json.Unmarshal(plain, v); err != nil {
		return false, station.Errorf(op, station.KindInvalid, "%s is corrupt (%v): write the identity again", name, err)
	}
	return true, nil
}

// gcm returns the AES-256-GCM of the data-encryption key sealed in the
// TPM, creating and sealing one on first use.
func (a *Agent) gcm(ctx context.Context) (cipher.AEAD, error) {
	const op = "unseal the identity key"
	a.dekMu.Lock()
	defer a.dekMu.Unlock()
	if a.dek == nil {
		b, err := a.vault.get(fileDEK)
		if err != nil {
			return nil, err
		}
		var dek []byte
		if b != nil {
			var blob hsm.KeyBlob
			if err := json.Unmarshal(b, &blob); err != nil {
				return nil, station.Errorf(op, station.KindInvalid, "%s is corrupt (%v): erase the data directory and provision again", fileDEK, err)
			}
			unlock := a.lockTPM()
			dek, err = a.htpm.Unseal(ctx, blob)
			unlock()
			if err != nil {
				return nil, fmt.Errorf("%s: %w", fileDEK, err)
			}
		} else {
			dek = make([]byte, 32)
			if _, err := rand.Read(dek); err != nil {
				return nil, station.E(op, station.KindInternal, err)
			}
			unlock := a.lockTPM()
			blob, err := a.htpm.Seal(ctx, dek)
			unlock()
			if err != nil {
				return nil, err
			}
			jb, err := json.Marshal(blob)
			if err != nil {
				return nil, station.E(op, station.KindInternal, err)
			}
			if err := a.vault.put(fileDEK, jb); err != nil {
				return nil, err
			}
		}
		if len(dek) != 32 {
			return nil, station.Errorf(op, station.KindInvalid, "the sealed key is %d bytes, not 32: erase the data directory and provision again", len(dek))
		}
		a.dek = dek
	}
	blk, err := aes.NewCipher(a.dek)
	if err != nil {
		return nil, station.E(op, station.KindInternal, err)
	}
	g, err := cipher.NewGCM(blk)
	if err != nil {
		return nil, station.E(op, station.KindInternal, err)
	}
	return g, nil
}
