// Package dps is the wire protocol of the Azure IoT Hub Device Provisioning
// Service (DPS) as Kiln speaks it, shared by the embedded server (devserver),
// the device agent and the service client (cloudsync): the JSON models of
// the device API and of the service API with DPS's exact key order and
// timestamp format, shared access signature (SAS) tokens and connection
// strings, and the server side of TPM attestation (the activation blob that
// carries a device's HMAC key to its TPM; the device side is
// hsm.TPM.ActivateDPS).
//
// The reference for every byte is the project's DPS protocol notes
// (dps-protocol.md); section numbers (§) in comments point into them. The
// package is pure Go and builds with CGO_ENABLED=0. Errors are
// *station.Error: malformed input is KindInvalid, signatures that do not
// check out and expired tokens are KindUnauthorized. Keys, signatures and
// tokens never appear in error messages.
package dps
