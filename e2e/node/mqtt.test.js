'use strict';
// Kiln DPS emulator compatibility: the DPS device API over MQTT and MQTT
// over WebSockets, driven by the official, unmodified Azure IoT Node SDK
// transports azure-iot-provisioning-device-mqtt (Mqtt, MqttWs; exact
// version in package.json) with symmetric-key attestation.
//
// Run by scripts/e2e-node.sh, which starts `kiln -v serve` on 127.0.0.1:443
// and passes:
//   KILN_GLOBAL_ENDPOINT  the DPS host name (MqttWs connects to wss://<it>:443/$iothub/websocket)
//   KILN_MQTT             the DPS MQTT address, host:port (Mqtt connects to mqtts://<it>)
//   KILN_ID_SCOPE         the ID scope
//   KILN_SERVICE_CS       the service connection string
// NODE_EXTRA_CA_CERTS must name kiln serve's trust bundle.
//
// Prints one line per case ("ok    NAME" or "FAIL  NAME: why") and exits 1
// if any case failed.

const { env, runCase, errText, assert, cb, finish, crash } = require('./harness');
const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const { Mqtt, MqttWs } = require('azure-iot-provisioning-device-mqtt');
const { ProvisioningServiceClient } = require('azure-iot-provisioning-service');

const globalEndpoint = env('KILN_GLOBAL_ENDPOINT');
const mqttAddr = env('KILN_MQTT');
const idScope = env('KILN_ID_SCOPE');
const serviceCS = env('KILN_SERVICE_CS');

// register runs a registration with transport (Mqtt: the endpoint is
// host:port; MqttWs: the host name, port 443).
function register(Transport, regId, key) {
  const endpoint = Transport === Mqtt ? mqttAddr : globalEndpoint;
  const client = ProvisioningDeviceClient.create(endpoint, idScope, new Transport(), new SymmetricKeySecurityClient(regId, key));
  return cb((done) => client.register(done));
}

function checkAssigned(r, deviceId) {
  const rs = r.registrationState || r;
  assert((r.status || rs.status) === 'assigned', `result ${JSON.stringify(r)}`);
  assert(rs.assignedHub, 'no assignedHub');
  assert(rs.deviceId === deviceId, `deviceId ${rs.deviceId}, want ${deviceId}`);
  return rs;
}

function otherKey(key) {
  const b = Buffer.from(key, 'base64');
  b[0] ^= 1;
  return b.toString('base64');
}

async function main() {
  const service = ProvisioningServiceClient.fromConnectionString(serviceCS);
  const ids = ['kiln-node-mqtt-1', 'kiln-node-mqtt-2', 'kiln-node-mqtt-3'];
  const keys = {};

  const enrolled = await runCase('service: createOrUpdateIndividualEnrollment × 3 (symmetric key)', async () => {
    for (const id of ids) {
      const { responseBody: e } = await service.createOrUpdateIndividualEnrollment({
        registrationId: id,
        deviceId: `${id}-device`,
        attestation: { type: 'symmetricKey', symmetricKey: {} },
        provisioningStatus: 'enabled',
      });
      keys[id] = e.attestation.symmetricKey.primaryKey;
      assert(keys[id], `no key for ${id}`);
    }
  });

  if (enrolled) {
    let hub;
    await runCase(`dps: register over MQTT (Mqtt, mqtts://${mqttAddr}) → assigned`, async () => {
      const rs = checkAssigned(await register(Mqtt, ids[0], keys[ids[0]]), `${ids[0]}-device`);
      hub = rs.assignedHub;
      return `hub ${rs.assignedHub}, device ${rs.deviceId}`;
    });
    await runCase('service: getDeviceRegistrationState after MQTT → assigned (same state as HTTPS)', async () => {
      const { responseBody: s } = await service.getDeviceRegistrationState(ids[0]);
      assert(s.status === 'assigned' && s.deviceId === `${ids[0]}-device` && s.assignedHub === hub, `state ${JSON.stringify(s)}`);
      return `assignedHub ${s.assignedHub}`;
    });
    await runCase('dps: register over MQTT over WebSockets (MqttWs, wss://…:443/$iothub/websocket) → assigned', async () => {
      const rs = checkAssigned(await register(MqttWs, ids[1], keys[ids[1]]), `${ids[1]}-device`);
      return `hub ${rs.assignedHub}, device ${rs.deviceId}`;
    });
    await runCase('dps: two devices register over MQTT at once, each gets its own answer', async () => {
      const [a, b] = await Promise.all([register(Mqtt, ids[0], keys[ids[0]]), register(Mqtt, ids[2], keys[ids[2]])]);
      checkAssigned(a, `${ids[0]}-device`);
      checkAssigned(b, `${ids[2]}-device`);
    });
    for (const [name, T] of [['MQTT', Mqtt], ['MQTT over WebSockets', MqttWs]]) {
      await runCase(`dps: a wrong key over ${name} is refused, the SDK fails`, async () => {
        let r;
        try {
          r = await register(T, ids[0], otherKey(keys[ids[0]]));
        } catch (err) {
          return errText(err);
        }
        throw new Error(`registered: ${JSON.stringify(r)}`);
      });
    }
  }

  await runCase('service: deleteIndividualEnrollment × 3', async () => {
    for (const id of ids) await service.deleteIndividualEnrollment(id);
  });

  finish();
}

main().catch(crash);
