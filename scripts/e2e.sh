#!/usr/bin/env bash
# End to end with the built binaries: simulated DUTs on ptys (in-process TPM
# simulator, and swtpm with a manufacturer-signed EK certificate), kiln
# provision, kiln records, kiln tpm info. Run by `make e2e` after `make build`.
set -euo pipefail
cd "$(dirname "$0")/.."
kiln=$PWD/bin/kiln
work=$(mktemp -d)
export KILN_HOME=$work/home
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
pass=0 fail=0
check() { # check NAME CONDITION-COMMAND...
  local name=$1; shift
  if "$@"; then echo "ok    $name"; pass=$((pass+1)); else echo "FAIL  $name"; fail=$((fail+1)); fi
}
wait_lines() { # wait_lines FILE N: until FILE has N lines (120 s: swtpm_setup makes RSA keys, slow on a busy machine)
  for _ in $(seq 1200); do [ "$(wc -l < "$1")" -ge "$2" ] && return 0; sleep 0.1; done
  echo "timed out waiting for $1"; cat "$1"; return 1
}

# 1. Two simulated DUTs with the in-process simulator (one process each).
"$kiln" simulate --count 2 --tpm sim --serial-prefix E2E- > "$work/sim.txt" 2> "$work/sim.log" &
pids+=($!)
wait_lines "$work/sim.txt" 2
mapfile -t ports < "$work/sim.txt"

"$kiln" provision --port "${ports[0]}" --ek-cert-policy require --roots "$KILN_HOME/simulator/ek-roots" --json > "$work/p1.json"
check "first DUT passes under require" grep -q '"result": "pass"' "$work/p1.json"
"$kiln" provision --port "${ports[1]}" > "$work/p2.txt"
check "second DUT passes" grep -q '^PASS' "$work/p2.txt"
set +e; "$kiln" provision --port "${ports[0]}" > "$work/p3.txt"; code=$?; set -e
check "the same unit again fails as a duplicate (exit 1)" test "$code" = 1
check "the duplicate names the earlier run" grep -q 'already provisioned' "$work/p3.txt"
"$kiln" records list > "$work/list.txt"
check "records list shows three runs" test "$(grep -c -E '^[0-9]+ ' "$work/list.txt")" = 3
serial=$(grep -o '"serial": "[^"]*"' "$work/p1.json" | head -1 | cut -d'"' -f4)
"$kiln" records show "$serial" > "$work/show.txt"
check "records show has the EK" grep -q 'EK sha256' "$work/show.txt"

# 2. A DUT on swtpm, whose EK certificate swtpm_setup signed.
"$kiln" simulate --count 1 --tpm swtpm --serial-prefix SWTPM- > "$work/sw.txt" 2> "$work/sw.log" &
pids+=($!)
wait_lines "$work/sw.txt" 1
swport=$(head -1 "$work/sw.txt" | cut -d' ' -f1)
roots=$(grep -o 'roots=[^ ]*' "$work/sw.log" | head -1 | cut -d= -f2-)
"$kiln" provision --port "$swport" --ek-cert-policy require --roots "$roots" > "$work/p4.txt"
check "swtpm DUT passes with its manufacturer root" grep -q '^PASS' "$work/p4.txt"

# 3. The agent commands on a serial line: socat joins two ptys back to back,
# the agent serves one end and the station provisions through the other.
serial_pair() { # serial_pair NAME: $work/NAME-dut and $work/NAME-station
  socat pty,raw,echo=0,link="$work/$1-dut" pty,raw,echo=0,link="$work/$1-station" 2>/dev/null &
  pids+=($!)
  for _ in $(seq 100); do [ -e "$work/$1-dut" ] && [ -e "$work/$1-station" ] && return 0; sleep 0.05; done
  echo "socat made no pty pair"; return 1
}
serial_pair sim
"$kiln" agent --port "$work/sim-dut" --tpm sim --serial AGENT-SIM-1 --model e2e --config "$work/agent-sim.json" 2> "$work/agent-sim.log" &
pids+=($!)
"$kiln" provision --port "$work/sim-station" --ek-cert-policy off > "$work/p5.txt"
check "kiln agent (simulator) over a serial pair passes" grep -q '^PASS  AGENT-SIM-1' "$work/p5.txt"

# The pure-Go kiln-agent that DUTs ship, with swtpm as the device's TPM.
port=$((20000 + RANDOM % 20000))
mkdir -p "$work/swtpm-state"
swtpm socket --tpm2 --server type=tcp,port=$port,bindaddr=127.0.0.1 --ctrl type=tcp,port=$((port+1)),bindaddr=127.0.0.1 \
  --flags not-need-init,startup-clear --tpmstate dir="$work/swtpm-state" &
pids+=($!)
serial_pair bin
sleep 0.3
"$PWD/bin/kiln-agent-linux-amd64" --port "$work/bin-dut" --tpm "swtpm:127.0.0.1:$port" --serial AGENT-BIN-1 --config "$work/agent-bin.json" 2> "$work/agent-bin.log" &
pids+=($!)
"$kiln" provision --port "$work/bin-station" --ek-cert-policy warn > "$work/p6.txt"
check "kiln-agent (pure Go) with swtpm over a serial pair passes" grep -q '^PASS  AGENT-BIN-1' "$work/p6.txt"
check "its EK was created on the empty TPM" grep -q 'EK created and persisted' "$work/p6.txt"
check "it registered with DPS and its telemetry reached the hub" grep -q 'verify-hub *ok' "$work/p6.txt"
check "the agent kept its configuration in its file (0600)" test "$(stat -c %a "$work/agent-bin.json")" = 600

# 4. The X.509 and symmetric-key methods with the pure-Go kiln-agent: with
# swtpm the agent makes its key in the TPM under the SRK; without a TPM the
# station writes a key derived from its group key.
port2=$((port + 2))
mkdir -p "$work/swtpm-x509"
swtpm socket --tpm2 --server type=tcp,port=$port2,bindaddr=127.0.0.1 --ctrl type=tcp,port=$((port2+1)),bindaddr=127.0.0.1 \
  --flags not-need-init,startup-clear --tpmstate dir="$work/swtpm-x509" &
pids+=($!)
serial_pair x509
sleep 0.3
"$PWD/bin/kiln-agent-linux-amd64" --port "$work/x509-dut" --tpm "swtpm:127.0.0.1:$port2" --serial AGENT-X509-1 \
  --config "$work/agent-x509.json" --data-dir "$work/agent-x509" 2> "$work/agent-x509.log" &
pids+=($!)
"$kiln" provision --port "$work/x509-station" --method x509 > "$work/p7.txt"
check "X.509 method: kiln-agent with swtpm passes end to end" grep -q '^PASS  AGENT-X509-1' "$work/p7.txt"
check "its key was made in the TPM" grep -q 'generate-key .*key in tpm storage' "$work/p7.txt"
check "it registered by its certificate and reached the hub" grep -q 'verify-hub *ok' "$work/p7.txt"
"$kiln" records show AGENT-X509-1 > "$work/show-x509.txt"
check "records show has the leaf and its thumbprint" grep -q 'thumbprint' "$work/show-x509.txt"
"$kiln" ca show > "$work/ca.txt"
check "kiln ca show counts the leaf issued" grep -q 'issued        1 leaves' "$work/ca.txt"

serial_pair sym
"$PWD/bin/kiln-agent-linux-amd64" --port "$work/sym-dut" --tpm "" --serial AGENT-SYM-1 \
  --config "$work/agent-sym.json" --data-dir "$work/agent-sym" 2> "$work/agent-sym.log" &
pids+=($!)
"$kiln" provision --port "$work/sym-station" --method symkey > "$work/p8.txt"
check "symmetric-key method: kiln-agent without a TPM passes end to end" grep -q '^PASS  AGENT-SYM-1' "$work/p8.txt"
check "the agent never logged its key" bash -c "! grep -qi 'key=[A-Za-z0-9+/]\{20,\}' '$work/agent-sym.log'"

# 5. The built-in QA scenarios of docs/qa: simulated DUTs in their own
# processes paced to 115200 baud, slots in parallel, a DPS per scenario with
# its faults, every method (TPM, X.509 with a station CA per scenario,
# symmetric key). Every scenario must be MET: none may be reported
# "not available".
qa_scenarios=$(ls docs/qa/*.scenario | wc -l)
set +e; "$kiln" qa run --out "$work/qa" docs/qa > "$work/qa.txt" 2> "$work/qa.log"; code=$?; set -e
grep -E '^(MET|NOT MET|NOT AVAILABLE) ' "$work/qa.txt" | sed 's/^/      /' || true
check "kiln qa run: the built-in scenarios meet their expectations (exit 0)" test "$code" = 0
check "every built-in scenario is MET" test "$(grep -c '^MET ' "$work/qa.txt")" = "$qa_scenarios"
for m in tpm x509 symkey; do
  check "$m scenarios all ran and met theirs" test "$(grep -c "^MET  *$m-" "$work/qa.txt")" = "$(ls docs/qa/$m-*.scenario | wc -l)"
done
check "JUnit XML has a testsuite per scenario" test "$(grep -c '<testsuite ' "$work/qa/junit.xml")" = "$qa_scenarios"
check "the HTML report has the timing charts" grep -q '<svg class="chart"' "$work/qa/report.html"
check "the report quotes the DPS's refusal of the expired certificate" grep -q 'the DPS says: attest X.509 device: the client certificate of' "$work/qa/report.html"
check "the quota scenario's DPS throttled with its own quota" grep -q 'kiln_dps_throttled_total [1-9]' "$work/qa/report.html"
set +e; printf 'name: hopeful\nmethod: tpm\nsimulated: 1\nfault: wrong-id-scope\nexpect: pass\n' > "$work/hopeful.scenario"
"$kiln" qa run --out "$work/qa-miss" "$work/hopeful.scenario" > "$work/qa-miss.txt" 2>&1; code=$?; set -e
check "kiln qa run exits 1 when an expectation is not met" test "$code" = 1

echo "$pass passed, $fail failed"
[ "$fail" = 0 ]
