// Package hsm is Kiln's TPM 2.0 work on go-tpm's tpm2 API: reading (and,
// when absent, creating and persisting) the endorsement key and the storage
// root key at their standard handles, reading the EK certificate from NV,
// and validating EK certificates against a folder of manufacturer roots;
// on the device, the DPS key import and HMAC, signing keys created under
// the SRK and used as a crypto.Signer (CreateSigningKey, Signer), and
// small secrets sealed under the SRK (Seal, Unseal).
//
// A TPM is reached through a transport.TPM: a Linux device (/dev/tpmrm0),
// swtpm over TCP or a unix socket (Open), the DUT link (OverLink), or the
// in-process simulator of the subpackage hsm/tpmsim. New wraps every
// transport in a layer that re-sends commands the TPM answers with
// TPM_RC_RETRY, TPM_RC_YIELDED or TPM_RC_TESTING.
//
// hsm never evicts a persistent object it did not create for DPS and never
// undefines an NV index: it runs against customers' devices. The one
// exception is DPSKeyHandle (0x81000100), which belongs to DPS and is
// replaced on every activation, as the Azure IoT SDKs do. Errors are *station.Error; TPM
// authorization failures are KindUnauthorized, transport failures
// KindUnavailable and malformed answers KindInvalid.
package hsm
