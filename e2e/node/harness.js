'use strict';
// The harness shared by Kiln's Node SDK compatibility suites: environment
// from scripts/e2e-node.sh, one line per case ("ok    NAME" or
// "FAIL  NAME: why"), the HTTP status of every exchange the SDK makes (seen
// through Node's own diagnostics channel, no SDK code touched), and the
// final "node: N passed, M failed" line.

const dc = require('diagnostics_channel');
const dns = require('dns');

// Hub host names under .localhost (kiln serve --hubs hub1.localhost,...)
// resolve to the loopback address, as RFC 6761 asks of resolvers; this
// machine's resolver (files, then DNS) does not, so the suites answer such
// lookups themselves. Node's net and tls read dns.lookup at every connect,
// so the SDK's own sockets go to 127.0.0.1 while TLS (SNI and the
// certificate check) and the MQTT user name keep the hub's name. No SDK
// code is touched.
const systemLookup = dns.lookup;
dns.lookup = function lookup(host, options, callback) {
  if (typeof options === 'function') {
    callback = options;
    options = {};
  }
  if (typeof host === 'string' && /\.localhost$/i.test(host)) {
    const all = options && typeof options === 'object' && options.all;
    if (all) return process.nextTick(callback, null, [{ address: '127.0.0.1', family: 4 }]);
    return process.nextTick(callback, null, '127.0.0.1', 4);
  }
  return systemLookup.call(dns, host, options, callback);
};

const caseTimeout = 60000;
let passed = 0;
let failed = 0;

// env returns a variable scripts/e2e-node.sh sets, or stops with a clear message.
function env(name) {
  const v = process.env[name];
  if (!v) {
    console.error(`${name} is not set: run this through scripts/e2e-node.sh`);
    process.exit(2);
  }
  return v;
}

const exchanges = [];
dc.subscribe('http.client.response.finish', ({ request, response }) => {
  exchanges.push({ method: request.method, path: request.path, status: response.statusCode });
});
const exchangesFor = (regId) => exchanges.filter((x) => x.path.includes(`/registrations/${regId}/`));
const describe = (xs) => xs.map((x) => `${x.method} ${x.path.replace(/\?.*/, '')} → ${x.status}`).join('; ');

// runCase runs one case with a time limit and prints its line.
async function runCase(name, fn) {
  let timer;
  try {
    const detail = await Promise.race([
      fn(),
      new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(`timed out after ${caseTimeout / 1000} s`)), caseTimeout); }),
    ]);
    console.log(`ok    ${name}${detail ? ` (${detail})` : ''}`);
    passed++;
    return true;
  } catch (err) {
    console.log(`FAIL  ${name}: ${errText(err)}`);
    failed++;
    return false;
  } finally {
    clearTimeout(timer);
  }
}

function errText(err) {
  if (!err) return String(err);
  let s = `${err.name || 'Error'}: ${err.message}`;
  if (err.response && err.response.statusCode) s += ` [HTTP ${err.response.statusCode}]`;
  if (err.responseBody) s += ` body=${String(err.responseBody).slice(0, 300)}`;
  if (err.result) s += ` result=${JSON.stringify(err.result).slice(0, 300)}`;
  return s;
}

function assert(cond, msg) {
  if (!cond) throw new Error(msg);
}

// cb turns a Node-style callback API into a promise.
const cb = (fn) => new Promise((resolve, reject) => fn((err, res) => (err ? reject(err) : resolve(res))));

// finish prints the suite's summary line and exits 1 when a case failed.
function finish() {
  console.log(`node: ${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}

// crash reports a suite that stopped on an unexpected error.
function crash(err) {
  console.log(`FAIL  node test crashed: ${errText(err)}`);
  process.exit(1);
}

module.exports = { env, exchangesFor, describe, runCase, errText, assert, cb, finish, crash };
