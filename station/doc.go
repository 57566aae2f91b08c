// Package station is the domain of a Kiln provisioning station: units,
// provisioning runs and their steps, the station profile, the domain error
// type, the interfaces the station needs from its adapters (Store, Link,
// Endorser, Verifier), and the provisioning workflow itself (Provisioner).
//
// It imports the standard library only. Adapters (station/sqlite, hsm, link,
// ...) implement its interfaces; cmd/kiln wires them together.
package station
