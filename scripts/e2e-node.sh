#!/usr/bin/env bash
# DPS compatibility with the official Azure IoT Node SDK clients:
# `kiln serve` (the embedded DPS and IoT hub) on 127.0.0.1:443, swtpm on
# 127.0.0.1:2323 (where tss.js looks for a TPM on Linux), then
# e2e/node/tpm.test.js: a TPM enrollment made with the service client,
# registration over HTTPS, telemetry to the assigned hub over MQTT with the
# TPM-held key, and the refusals; and e2e/node/symkey.test.js: the same with
# a symmetric-key enrollment (primary and secondary keys, the hub reached
# with a device connection string), and its refusals; and e2e/node/mqtt.test.js:
# symmetric-key registration over MQTT (kiln serve's --mqtt-addr, printed as
# "mqtt") and MQTT over WebSockets (wss://127.0.0.1:443/$iothub/websocket). Run by `make e2e` after `make build`; needs
# root (the SDK's HTTP transport and service client only use port 443), Node
# 20 and npm, swtpm, openssl (e2e/node/x509.test.js: X.509 group and individual
# enrollments over HTTPS, then the hub over MQTT with the same certificate);
# and e2e/node/symkeygroup.test.js: a symmetric-key enrollment group made with
# the service client, a device registering with a key derived from the group
# key as the SDK's sample derives it, the hub reached with that key, and the
# refusals; and e2e/node/service.test.js: the service client's create, get,
# paged query, If-Match update and delete (412 on a stale etag), bulk (and a
# bulk of 11 refused) for enrollments and groups, and registration states.
# kiln serve links two hubs by host name (--hubs hub1.localhost,hub2.localhost=2)
# with a latency map and a trusted webhook
# certificate, which e2e/node/hubs.test.js checks (hashed, geoLatency, static
# and custom allocation; devices reach their hub by its name); the suites'
# harness resolves *.localhost to 127.0.0.1.
# KILN_E2E_NODE_TESTS="symkeygroup ..." runs only the suites named.
# Prints "N passed, M failed" last; exits 1 on a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
kiln=$root/bin/kiln

die() { echo "e2e-node: $*" >&2; echo "0 passed, 1 failed"; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root: kiln serve has to listen on 127.0.0.1:443, the only port the Node SDK's DPS HTTP transport and service client use"
[ -x "$kiln" ] || die "$kiln is missing: run make build first"
command -v node >/dev/null && command -v npm >/dev/null || die "node and npm are required (Node 20)"
command -v swtpm >/dev/null || die "swtpm is not installed: apt-get install swtpm swtpm-tools"
for port in 443 2323 2324; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then die "127.0.0.1:$port is in use: stop what listens there"; fi
done

# The SDK packages, exactly as pinned by the lock (no install scripts: tss.js
# pulls ffi-napi, which does not build on Node 20 and is only used on Windows).
(cd e2e/node && if [ -f package-lock.json ]; then npm ci --ignore-scripts --no-audit --no-fund --loglevel=error;
  else npm install --ignore-scripts --no-audit --no-fund --loglevel=error; fi) >/dev/null || die "npm install failed in e2e/node"

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
pass=0 fail=0
check() { # check NAME CONDITION-COMMAND...
  local name=$1; shift
  if "$@"; then echo "ok    $name"; pass=$((pass+1)); else echo "FAIL  $name"; fail=$((fail+1)); fi
}

# swtpm with a fresh state: tss.js finds no /dev/tpm*, falls back to
# 127.0.0.1:2323 and frames commands as the MS simulator's TPM_SEND_COMMAND
# (cmd 8, locality, size, command), which swtpm's TCP server recognises and
# answers in the same framing (size, response, 0). The SDK makes the EK and SRK.
mkdir -p "$work/swtpm"
swtpm socket --tpm2 --server type=tcp,port=2323,bindaddr=127.0.0.1 --ctrl type=tcp,port=2324,bindaddr=127.0.0.1 \
  --flags not-need-init,startup-clear --tpmstate dir="$work/swtpm" > "$work/swtpm.log" 2>&1 &
pids+=($!)

# The DPS emulator, with a throwaway home; -v logs the hub's telemetry. Two
# hubs by name, the second nearer by the latency map; the custom allocation
# webhook of hubs.test.js serves a certificate kiln serve is told to trust.
export KILN_HOME=$work/home
printf '# network hub latency\n127.0.0.0/8 hub1.localhost 50ms\n127.0.0.0/8 hub2.localhost 1ms\n' > "$work/latency.txt"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=127.0.0.1 \
  -addext subjectAltName=IP:127.0.0.1 -keyout "$work/webhook.key" -out "$work/webhook.pem" 2>/dev/null || die "openssl could not make the webhook certificate"
export KILN_WEBHOOK_CERT=$work/webhook.pem KILN_WEBHOOK_KEY=$work/webhook.key
"$kiln" -v serve --addr 127.0.0.1:443 --json --hubs hub1.localhost,hub2.localhost=2 \
  --latency-map "$work/latency.txt" --webhook-trust "$work/webhook.pem" > "$work/serve.json" 2> "$work/serve.log" &
pids+=($!)
for _ in $(seq 300); do
  grep -q '}' "$work/serve.json" 2>/dev/null && (exec 3<>/dev/tcp/127.0.0.1/2323) 2>/dev/null && break
  sleep 0.1
done
grep -q '}' "$work/serve.json" || { cat "$work/serve.log" >&2; die "kiln serve did not start"; }
(exec 3<>/dev/tcp/127.0.0.1/2323) 2>/dev/null || { cat "$work/swtpm.log" >&2; die "swtpm did not start"; }
field() { node -e 'const j = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")); console.log(j[process.argv[2]])' "$work/serve.json" "$1"; }
endpoint=$(field global_endpoint)
cs=$(field service_connection_string)
export NODE_EXTRA_CA_CERTS
NODE_EXTRA_CA_CERTS=$(field trust_bundle)
# The SDK wants host names and connects to 443 itself; kiln serve prints
# them so on 443, and the checks below prove it.
export KILN_GLOBAL_ENDPOINT=$endpoint
export KILN_SERVICE_CS=$cs
export KILN_ID_SCOPE
KILN_ID_SCOPE=$(field id_scope)
export KILN_SERVE_LOG=$work/serve.log
export KILN_MQTT
KILN_MQTT=$(field mqtt)
export KILN_HUBS
KILN_HUBS=$(node -e 'console.log(JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")).hubs.join(","))' "$work/serve.json")
check "kiln serve prints the global endpoint as the SDK wants it (host only on 443)" test "$endpoint" = "127.0.0.1"
check "kiln serve prints the service connection string as the SDK wants it (HostName without :443)" grep -q '^HostName=127.0.0.1;' <<< "$cs"
check "kiln serve prints the linked hubs by name with the hub's port" grep -Eq '^hub1\.localhost:[0-9]+,hub2\.localhost:[0-9]+$' <<< "$KILN_HUBS"

for t in ${KILN_E2E_NODE_TESTS:-tpm symkey mqtt x509 symkeygroup service hubs}; do
  set +e
  node --no-deprecation "e2e/node/$t.test.js" | tee "$work/node-$t.txt"
  set -e
  n_ok=$(grep -c '^ok ' "$work/node-$t.txt" || true)
  n_fail=$(grep -c '^FAIL ' "$work/node-$t.txt" || true)
  pass=$((pass + n_ok)) fail=$((fail + n_fail))
  grep -q '^node: ' "$work/node-$t.txt" || { echo "FAIL  the node test $t.test.js did not finish"; fail=$((fail+1)); }
done
if [ "$fail" != 0 ]; then
  echo "--- kiln serve log (last 40 lines)"; tail -n 40 "$work/serve.log"
fi
echo "$pass passed, $fail failed"
[ "$fail" = 0 ]
