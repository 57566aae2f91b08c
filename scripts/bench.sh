#!/usr/bin/env bash
# Runs the benchmarks and writes docs/performance.md. Each benchmark measures
# its own baseline in the same run and reports the ratio as a metric named
# *-ratio (or x-*), so the figures mean the same on any machine.
set -euo pipefail
cd "$(dirname "$0")/.."
benchtime=${1:-5x}
mkdir -p .bench docs
raw=.bench/bench.txt
# devserver's BenchmarkRegisterLatencyEnrollments compares 1 k with this many
# enrollments: DPS's limit of a million (go test alone uses 100,000).
export KILN_BENCH_ENROLLMENTS=${KILN_BENCH_ENROLLMENTS:-1000000}
# cloudsync's push benchmark runs once (-benchtime=1x): one op is a push of
# 10,000 enrollments at DPS's quota, about a minute.
pkgs=$(go list ./... | grep -v '/cloudsync$')
go test -run='^$' -bench=. -benchtime="$benchtime" -count=1 -timeout 30m $pkgs | tee "$raw"
go test -run='^$' -bench=. -benchtime=1x -count=1 -timeout 30m ./cloudsync/ | tee -a "$raw"
grep -q '^ok' "$raw" || { echo "bench: no package passed" >&2; exit 1; }
if grep -q '^FAIL' "$raw"; then echo "bench: a benchmark failed" >&2; exit 1; fi

{
  echo "# Performance"
  echo
  echo "Written by \`make bench\` (scripts/bench.sh) on $(date -u +%Y-%m-%d) — $(go version | cut -d' ' -f3),"
  echo "$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')."
  echo "Every ratio is measured against a baseline taken in the same run."
  echo
  if [ -f docs/performance-notes.md ]; then cat docs/performance-notes.md; echo; fi
  echo "## Results"
  echo
  echo "| benchmark | runs | metrics |"
  echo "|---|---|---|"
  awk '/^Benchmark/ {
         name=$1; sub(/-[0-9]+$/, "", name); runs=$2; m="";
         for (i = 3; i + 1 <= NF; i += 2) { m = m (m == "" ? "" : ", ") $i " " $(i+1) }
         printf("| %s | %s | %s |\n", name, runs, m)
       }' "$raw"
  echo
  # Goals the notes name, checked against this run's figures.
  echo "## Goals"
  echo
  echo "| benchmark | metric | goal | measured | met |"
  echo "|---|---|---|---|---|"
  goals="BenchmarkProvisionTPM115200 line-time-ratio <= 1.25;BenchmarkSlots115200 x-1slot >= 6"
  goals="$goals;BenchmarkSymmetricKeyRegistrationMQTT x-baseline-rate >= 0.5"
  goals="$goals;BenchmarkRegisterLatencyEnrollments p99-ratio <= 1.5"
  goals="$goals;BenchmarkRegisterLatencyEnrollments load-enrollments/s >= 50000"
  goals="$goals;BenchmarkPush10k ceiling-ratio >= 0.95"
  awk -v goals="$goals" '
    BEGIN { n = split(goals, g, ";") }
    /^Benchmark/ {
      name = $1; sub(/-[0-9]+$/, "", name)
      for (k = 1; k <= n; k++) {
        split(g[k], f, " ")
        if (f[1] != name) continue
        for (i = 3; i + 1 <= NF; i += 2) if ($(i+1) == f[2]) {
          ok = (f[3] == "<=") ? ($i <= f[4]) : ($i >= f[4])
          printf("| %s | %s | %s %s | %s | %s |\n", name, f[2], f[3], f[4], $i, ok ? "yes" : "**no**")
        }
      }
    }' "$raw"
  echo
  echo "## Raw output"
  echo
  echo '```'
  grep -E '^(Benchmark|goos|goarch|pkg|cpu)' "$raw"
  echo '```'
} > docs/performance.md
echo "wrote docs/performance.md"
