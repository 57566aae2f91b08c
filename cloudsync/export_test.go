package cloudsync

import "crypto/ecdsa"

// SignJWSForTest signs payload as a vendor would: ES256 with an x5c chain.
func SignJWSForTest(key *ecdsa.PrivateKey, x5c []string, payload []byte) (string, error) {
	return signJWS(key, jwsHeader{Typ: "JWT", X5C: x5c}, payload)
}
