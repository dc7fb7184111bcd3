# Everything a developer or CI runs. `make test` is the test command CI calls.
CARGO ?= cargo

.PHONY: all build cluster flink-cli-test dashboard-test chaos chaos-smoke image compose-up compose-down compose-test k8s-validate python-deps test fmt fmt-check lint doc verify bench bench-bins bench-compare bench-1m clean

all: build

build:
	$(CARGO) build --workspace --all-targets

## Three replicas on loopback (127.0.0.1:7001-7003) and two TaskManagers, data under
## ./data, in the foreground with their logs; a process that dies is restarted after 2 s;
## Ctrl-C stops them all (scripts/cluster.sh has the CLUSTER_* overrides).
cluster:
	scripts/cluster.sh

IMAGE ?= dispatcher:dev
COMPOSE := $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)

## The container image (FROM scratch around our release binaries and the libraries they link).
image:
	$(CARGO) build --release --bins
	deploy/image/build-rootfs.sh target/release target/image/rootfs
	docker build -t $(IMAGE) -f deploy/Dockerfile target/image/rootfs

COMPOSE_CERTS := target/compose/certs

## Three replicas and two TaskManagers in Docker (host endpoints 127.0.0.1:7101-7103),
## with TLS and tokens: copies the cluster's CA and admin token to target/compose/certs
## and prints the lines to export.
compose-up:
	DISPATCHER_IMAGE=$(IMAGE) $(COMPOSE) -p dispatcher -f deploy/compose.yaml up -d
	mkdir -p $(COMPOSE_CERTS)
	umask 077 && for f in ca.crt admin.token; do \
		DISPATCHER_IMAGE=$(IMAGE) $(COMPOSE) -p dispatcher -f deploy/compose.yaml \
			exec -T dispatcher-1 cat /certs/$$f > $(COMPOSE_CERTS)/$$f || exit 1; \
	done
	@echo "export DISPATCHCTL_ENDPOINTS=127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103"
	@echo "export DISPATCHER_CA=$(CURDIR)/$(COMPOSE_CERTS)/ca.crt DISPATCHER_TOKEN_FILE=$(CURDIR)/$(COMPOSE_CERTS)/admin.token"

compose-down:
	DISPATCHER_IMAGE=$(IMAGE) $(COMPOSE) -p dispatcher -f deploy/compose.yaml down -v --remove-orphans
	rm -rf $(COMPOSE_CERTS)

## The compose cluster under docker kill, network disconnect, rolling and full restarts.
compose-test:
	DISPATCHER_IMAGE=$(IMAGE) deploy/compose-test.sh

PYENV := target/pyenv

## Validates deploy/kubernetes against the Kubernetes 1.30 schemas (offline, strict).
k8s-validate: $(PYENV)/.k8s-installed
	$(PYENV)/bin/kubernetes-validate --strict -k 1.30.0 deploy/kubernetes/*.yaml

$(PYENV)/.k8s-installed: $(PYENV)/.installed deploy/kubernetes/requirements.txt
	$(PYENV)/bin/pip install --quiet --disable-pip-version-check -r deploy/kubernetes/requirements.txt
	touch $@

## A Python virtualenv with grpcio, for the interoperability test (PyPI).
python-deps: $(PYENV)/.installed

$(PYENV)/.installed: tests/python/requirements.txt
	python3 -m venv $(PYENV)
	$(PYENV)/bin/pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
	touch $@

## Every test of the workspace: unit, property (256+ cases each), raft, end-to-end,
## then a short chaos run with a fixed seed so the harness cannot rot.
test: python-deps
	# The end-to-end tests run the binaries of other packages, which cargo test does
	# not build for them: build them first.
	$(CARGO) build --workspace --bins
	DISPATCHER_PYTHON=$(CURDIR)/$(PYENV)/bin/python $(CARGO) test --workspace --all-targets
	$(MAKE) chaos-smoke

## Flink's own CLI (`flink list`, `flink cancel` from Apache Flink's distribution)
## against live clusters' REST API (--http-listen; plain, then TLS with tokens), checked
## with dispatchctl. Installs
## a Java runtime from Debian's packages when missing and Flink from PyPI (target/flink-cli).
flink-cli-test:
	$(CARGO) build --workspace --bins
	FLINK_TEST_BIN=$${CARGO_TARGET_DIR:-$(CURDIR)/target}/debug scripts/flink-cli-test.sh

## The web dashboard in headless Chromium (Debian's package, installed when missing) driven
## by Playwright for Python (target/dashboard-venv, PyPI) against a live secured cluster;
## screenshots of every page in target/dashboard-screenshots/.
dashboard-test:
	$(CARGO) build --workspace --bins
	DASHBOARD_TEST_BIN=$${CARGO_TARGET_DIR:-$(CURDIR)/target}/debug scripts/dashboard-test.sh

fmt:
	$(CARGO) fmt --all

fmt-check:
	$(CARGO) fmt --all -- --check

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

doc:
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps

## Read-only gate: formatting, lints, tests and docs.
verify: fmt-check lint test doc

## A chaos campaign: every nemesis, seeds 1-10, 3 minutes each (real processes).
chaos:
	$(CARGO) build --bins
	$(CARGO) run -p chaos -- campaign --seeds 10 --duration 180 --nemesis all --out target/chaos

## A short chaos run with a fixed seed (about 90 s).
chaos-smoke:
	$(CARGO) build --bins
	$(CARGO) run -p chaos -- run --seed 1 --duration 30 --nemesis all --out target/chaos-smoke

BENCH := target/release/dispatch-bench

bench-bins:
	$(CARGO) build --release --bins -p dispatcher-server -p dispatcher-client -p dispatch-bench

## Benchmarks (docs/benchmarks.md): state-machine apply and placement and durable log
## appends (criterion), then a real three-replica cluster (TLS and tokens) under dispatch-bench: submit
## at 1/16/64/256 submitters, failover (kill -9 and SIGSTOP of the leader), placement of
## 100,000 tasks on 10,000 simulated TaskManagers, recovery of a large state, and 300
## watchers of one big job (watch-fanout).
bench: bench-bins
	$(CARGO) bench --bench apply
	$(CARGO) bench --bench storage
	$(BENCH) submit --concurrency 1,16,64,256 --count 10000 --seconds 20
	$(BENCH) failover --fault kill --trials 10
	$(BENCH) failover --fault stop --trials 10
	$(BENCH) place --task-managers 10000 --slots 100 --jobs 1000 --tasks 100
	$(BENCH) recover --jobs 20000
	$(BENCH) watch-fanout

## The placement goal: 1,000,000 tasks on 10,000 TaskManagers x 100 slots. It does not
## finish yet (docs/benchmarks.md says where it stalls), so it is not part of `bench`.
bench-1m: bench-bins
	$(BENCH) place --task-managers 10000 --slots 100 --jobs 10000 --tasks 100

## The same submit and failover workloads against 3-member etcd 3.4 and ZooKeeper 3.8
## clusters (installed from Debian's packages if missing), then ours with TLS and tokens
## and in plain text, with ratios and the cost of TLS (etcd and ZooKeeper run without TLS).
bench-compare: bench-bins
	scripts/bench-deps.sh
	$(BENCH) compare --systems etcd,zookeeper,dispatcher --concurrency 1,64 --count 5000 --trials 10

clean:
	$(CARGO) clean
