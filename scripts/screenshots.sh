#!/usr/bin/env bash
# screenshots.sh: run the real station GUI (bin/kiln gui, simulated DUT) under
# Xvfb, drive it with xdotool like a technician with a barcode scanner, and
# capture each screen into docs/screenshots/.
set -euo pipefail
cd "$(dirname "$0")/.."
KILN=${KILN:-bin/kiln}
OUT=${OUT:-docs/screenshots}
DISPLAY_NUM=${DISPLAY_NUM:-97}
mkdir -p "$OUT"
home=$(mktemp -d /tmp/kiln-shots.XXXXXX)
export LANG=en_US.UTF-8 KILN_HOME="$home" DISPLAY=":$DISPLAY_NUM"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$home"
}
trap cleanup EXIT

Xvfb ":$DISPLAY_NUM" -screen 0 1280x800x24 -nolisten tcp >"$home/xvfb.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do xdotool getdisplaygeometry >/dev/null 2>&1 && break; sleep 0.1; done

# A supervisor password, so that the Settings and Batches screens can be
# shown as a supervisor sees them.
SUPERVISOR_PW=screenshot-supervisor
printf '%s\n' "$SUPERVISOR_PW" | "$KILN" gui --set-supervisor-password >/dev/null

# A batch target: a second devserver (kiln serve) stands in for the
# customer's Azure DPS, so that the Batches screen pushes to a real service
# API. Its connection string goes in on standard input, as an operator
# would give it, and is stored sealed.
"$KILN" serve --data "$home/customer-dps" --json >"$home/serve.json" 2>"$home/serve.log" &
pids+=($!)
for _ in $(seq 150); do grep -q trust_bundle "$home/serve.json" 2>/dev/null && break; sleep 0.1; done
conn=$(sed -n 's/.*"service_connection_string": *"\([^"]*\)".*/\1/p' "$home/serve.json")
trust=$(sed -n 's/.*"trust_bundle": *"\([^"]*\)".*/\1/p' "$home/serve.json")
[ -n "$conn" ] || { cat "$home/serve.log"; echo "kiln serve did not start" >&2; exit 1; }
printf '%s\n' "$conn" | "$KILN" batch target add customer-lab --connection-string-file - --trust "$trust" --ops-per-minute 600 >/dev/null
unset conn

"$KILN" gui --operator "Ana Silva" >"$home/kiln.log" 2>&1 &
kiln_pid=$!
pids+=($kiln_pid)

# Wait for the window.
win=""
for _ in $(seq 150); do
  win=$(xdotool search --name "^Kiln" 2>/dev/null | head -1 || true)
  [ -n "$win" ] && break
  kill -0 "$kiln_pid" 2>/dev/null || { cat "$home/kiln.log"; echo "kiln gui exited" >&2; exit 1; }
  sleep 0.2
done
[ -n "$win" ] || { cat "$home/kiln.log"; echo "no kiln window" >&2; exit 1; }
xdotool windowmove "$win" 0 0 windowsize "$win" 1280 800 windowactivate --sync "$win" 2>/dev/null || true
xdotool windowfocus --sync "$win" 2>/dev/null || true
sleep 3
shot() { import -window root "$OUT/$1"; echo "wrote $OUT/$1"; }

# The scan field has the focus: a wedge types the serial and Enter. An empty
# Enter provisions the simulated DUT under the serial it reports.
xdotool mousemove --window "$win" 480 195 click 1
sleep 0.5
xdotool key --window "$win" Return
for _ in $(seq 120); do
  sleep 0.5
  # The run takes a few seconds (115200 baud, DPS registration, hub).
  if [ -f "$home/kiln.db" ] && [ "$("$KILN" records list --result pass 2>/dev/null | grep -c SIM- || true)" -ge 1 ]; then break; fi
done
sleep 2
shot station.png

xdotool key --window "$win" alt+2
sleep 2
# Select the newest run to show its evidence.
xdotool mousemove --window "$win" 300 195 click 1
sleep 2
shot records.png

xdotool key --window "$win" alt+4
sleep 2
shot devserver.png

# Log in as a supervisor: pick the role, type the password.
xdotool mousemove --window "$win" ${ROLE_X:-1200} ${ROLE_Y:-58} click 1
sleep 1
xdotool key --window "$win" Down Down Return 2>/dev/null || true
sleep 1
xdotool mousemove --window "$win" ${PASSWORD_X:-820} ${PASSWORD_Y:-58} click 1
sleep 0.5
xdotool type --window "$win" --delay 20 "$SUPERVISOR_PW"
xdotool key --window "$win" Return
sleep 2

xdotool key --window "$win" alt+3
sleep 2
# Seal the open batch (the unit that passed is in it): it is bound to the
# only target, then push it and let the push and its read-back finish.
xdotool mousemove --window "$win" ${SEAL_X:-560} ${SEAL_Y:-247} click 1
sleep 2
xdotool mousemove --window "$win" ${PUSH_X:-660} ${PUSH_Y:-247} click 1
for _ in $(seq 60); do
  sleep 0.5
  "$KILN" batch list 2>/dev/null | grep -q " pushed " && break
done
sleep 2
shot batches.png

xdotool key --window "$win" alt+5
sleep 2
shot settings.png

xdotool key --window "$win" alt+1
sleep 1
kill "$kiln_pid" 2>/dev/null || true
