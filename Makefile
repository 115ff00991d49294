# Every target creates the virtualenv it needs; `make test` and `make demo` work on a fresh Debian.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev

.PHONY: demo run test bench bench-storm storm-lost bench-day0 soak schemas clean

$(STAMP): pyproject.toml
	@sh scripts/ensure-venv.sh "$(PYTHON)" "$(VENV)"
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP) ## onboard one simulated device of each type through a real embedded broker
	$(BIN)/homenet demo

run: $(STAMP) ## the gateway: embedded broker on 0.0.0.0:1883 and :::1883 and the configurator
	$(BIN)/homenet gateway run $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -ra $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/homenet bench onboard

bench-storm: $(STAMP) ## N agents at once (250, 1000, 5000) on amqtt and Mosquitto; ARGS="--agents 1000 --timeout 120"
	$(BIN)/homenet bench storm $(ARGS)

storm-lost: $(STAMP) ## "no device lost, ever": 20 consecutive 1,000-device storms, exit 1 if one device is not confirmed; ARGS="--broker gw-mosquitto"
	$(BIN)/homenet bench storm --agents 1000 --repeat 20 --timeout 120 --no-footprint --no-renumber $(or $(ARGS),--broker amqtt)

bench-day0: $(STAMP) ## day-0 time (link-up to usable IPv4), homenet against DHCP; root, dnsmasq-base, busybox
	$(BIN)/python -m homenet.bench.day0 $(ARGS)

soak: $(STAMP) ## devices join, leave, flap, broker and configurator restarted, then the invariants (docs/soak.md); ARGS="--duration 600 --broker mosquitto"
	$(BIN)/python -m homenet.bench.soak $(ARGS)

schemas: $(STAMP) ## regenerate schemas/json from the models and schemas/vectors from the fixed keys
	$(BIN)/python -m homenet.schemas.jsonschema
	$(BIN)/python -m homenet.schemas.testvectors

clean:
	rm -rf $(VENV) build *.egg-info
