// Package cloudsync takes batches of recorded units to the outside world:
// it pushes them to a DPS service API (Azure's, or Kiln's own devserver)
// through bulk operations paced under the service's operations quota, with
// a durable outbox in the station's store so that a push stopped at any
// point resumes without duplicates; it flips two-phase enrollments from
// disabled to enabled; and it exports batches as files for customers: DPS
// bulk-operation JSON, CSV, and a manifest of one ES256 JWS per unit. It
// also reads vendor manifests (Microchip style: JWS entries with an x5c
// chain) so that pre-provisioned parts can be enrolled.
//
// Secrets (target connection strings, the manifest signing key) are sealed
// with AES-256-GCM under a data key kept in a file of its own (see
// LoadSealer), never in the database and never in logs.
package cloudsync
