// Package devserver is Kiln's embedded Device Provisioning Service: a
// wire-compatible implementation of Azure IoT Hub DPS (device API, service
// API, attestation, allocation to linked hubs) with an embedded IoT Hub
// endpoint, so that every unit is proven end to end before it ships, and so
// that developers can run `kiln serve` in place of the cloud.
package devserver
