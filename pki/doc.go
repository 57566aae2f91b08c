// Package pki is the station's signing CA: it creates or loads a root and an
// intermediate (or an intermediate under a customer's root, by CSR out and
// signed certificate in), issues device leaves from CSRs made on the DUT, and
// keeps the CA key in custody.
//
// Issuance runs through an embedded smallstep authority
// (github.com/smallstep/certificates/authority) driven by an x509util
// template from the station's Profile, parsed once and cached. Every request
// is checked before anything is signed: the CSR signature, that its subject
// CN is the unit's registration ID, and that its key type is one the profile
// allows. Caps per batch and per shift are enforced against an IssuanceLog,
// which records every leaf (serial, subject, public-key hash, registration
// ID, operator, batch, time); FileLog is the file-based default.
//
// The CA key arrives as a crypto.Signer from a KeyStore: FileKeys keeps it
// encrypted at rest (AES-256-GCM under a scrypt-derived key, parameters and
// salt stored in the file, mode 0600); PKCS11Keys keeps it in a token. The key
// is never written in clear and never logged.
//
// Remote is the alternative when the factory already runs a step-ca: the same
// checks, caps and log, with signing done by the remote CA through its JWK
// provisioner.
package pki
