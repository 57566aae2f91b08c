# Kiln: the device-provisioning station. `make run` and `make test` are the two
# commands a newcomer needs; every target installs what it uses.

SHELL := /bin/bash
GO ?= go
BIN := $(CURDIR)/bin
KILN := $(BIN)/kiln
STATICCHECK_VERSION := v0.8.2
FUZZTIME ?= 30s
BENCHTIME ?= 5x
export KILN_HOME ?= $(CURDIR)/kiln-data
# Fyne cannot parse the C/POSIX locales and says so on every start.
ifneq ($(filter-out C POSIX,$(LANG)),)
export LANG
else
export LANG := C.UTF-8
endif

# Debian packages, from platform-notes: what building (cgo: the TPM simulator
# links libcrypto, SQLite needs gcc) and testing (swtpm, tpm2-tools) need.
APT_BUILD := make gcc libc6-dev pkg-config libssl-dev \
	libgl1-mesa-dev libx11-dev libxcursor-dev libxrandr-dev libxinerama-dev libxi-dev libxxf86vm-dev
APT_TEST  := swtpm swtpm-tools tpm2-tools socat softhsm2 ca-certificates
# What `make screenshots` needs to run the GUI under Xvfb and drive it.
APT_SHOTS := xvfb xauth x11-apps imagemagick xdotool

.PHONY: all deps apt apt-shots build agents run demo screenshots apt-install test test-short bench fuzz lint e2e qa qa-screenshot clean

all: build

## deps: install the Debian packages that are missing, then the Go modules.
deps: apt
	$(GO) mod download

apt:
	@$(MAKE) --no-print-directory apt-install PKGS="$(APT_BUILD) $(APT_TEST)"

apt-shots:
	@$(MAKE) --no-print-directory apt-install PKGS="$(APT_SHOTS)"

apt-install:
	@missing=""; for p in $(PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

## build: the station binary and the device agent for the DUT architectures.
build: deps
	$(GO) build -o $(KILN) ./cmd/kiln
	$(MAKE) --no-print-directory agents

agents:
	CGO_ENABLED=0 GOOS=linux GOARCH=amd64 $(GO) build -trimpath -ldflags=-s -o $(BIN)/kiln-agent-linux-amd64 ./cmd/kiln-agent
	CGO_ENABLED=0 GOOS=linux GOARCH=arm64 $(GO) build -trimpath -ldflags=-s -o $(BIN)/kiln-agent-linux-arm64 ./cmd/kiln-agent
	CGO_ENABLED=0 GOOS=linux GOARCH=arm GOARM=7 $(GO) build -trimpath -ldflags=-s -o $(BIN)/kiln-agent-linux-arm ./cmd/kiln-agent

## run: the station GUI on its embedded default (data dir ./kiln-data, the
## embedded DPS, a simulated DUT).
run: build
	$(KILN) gui

## demo: provision one simulated unit end to end on the command line.
demo: build
	$(KILN) demo

## screenshots: the real GUI under Xvfb, driven by xdotool to a PASS; PNGs of
## each screen in docs/screenshots/.
screenshots: build apt-shots
	./scripts/screenshots.sh

## test: vet and the race-enabled test suite (agent/TestCrossBuild builds the
## pure-Go agent for linux/arm64, arm and amd64).
test: deps
	$(GO) vet ./...
	$(GO) test -race -count=1 -timeout 12m ./...

## bench: benchmarks with ratios against baselines measured in the same run;
## results go to docs/performance.md.
bench: deps
	./scripts/bench.sh "$(BENCHTIME)"

## fuzz: every fuzz target for FUZZTIME each.
fuzz: deps
	./scripts/fuzz.sh "$(FUZZTIME)"

## lint: go vet and staticcheck.
lint: deps
	@test -x $(BIN)/staticcheck || GOBIN=$(BIN) $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)
	$(GO) vet ./...
	$(BIN)/staticcheck ./...

## e2e: the built binaries end to end: simulated DUTs on ptys, provision, records.
e2e: build
	./scripts/e2e.sh
	./scripts/e2e-node.sh
	$(GO) test -tags stepca -count=1 -run RemoteStepCA ./pki/ ./cmd/kiln/

## qa: the built-in QA scenarios of docs/qa on simulated DUTs; reports in bin/qa/.
qa: build
	rm -rf $(BIN)/qa
	$(KILN) qa run --out $(BIN)/qa docs/qa

## qa-screenshot: docs/qa/report.png, the HTML report of a few scenarios in
## headless Chromium (Debian's chromium package).
QA_SHOT := tpm-golden x509-golden symkey-golden tpm-dut-drops-out x509-expired-certificate symkey-disabled-group tpm-throttled-dps
qa-screenshot: build
	@$(MAKE) --no-print-directory apt-install PKGS="chromium"
	rm -rf $(BIN)/qa-shot
	$(KILN) qa run --out $(BIN)/qa-shot $(patsubst %,docs/qa/%.scenario,$(QA_SHOT))
	chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1180,1900 \
	  --screenshot=$(CURDIR)/docs/qa/report.png file://$(BIN)/qa-shot/report.html

clean:
	rm -rf $(BIN)
