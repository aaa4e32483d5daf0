# nightread: `make demo` runs the main job on embedded defaults; `make test` runs the tests.
# Both create and reuse a virtual environment at .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Every package comes from requirements.lock (exact versions and hashes, made by `make lock` with uv);
# pip takes torch and torchvision from this machine's local wheels when it has them.
LOCK := requirements.lock
LOCK_PLATFORM := x86_64-manylinux_2_35
STAMP := $(VENV)/.installed

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1

.PHONY: venv lock check-lock demo test lint clean fuzz bench-retrieval bench-triton bench-db bench-scale bench-engine bench-render bench-receiver chaos deploy-check

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m tests.lockfile --extraneous | xargs -r $(BIN)/python -m pip uninstall -q -y
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m tests.lockfile --check
	touch $(STAMP)

venv: $(STAMP)

# refresh the lock to the newest releases pyproject.toml (and requirements-lock.in) allow; then
# `make test`, and commit pyproject.toml, requirements-lock.in and requirements.lock together
lock: venv
	$(BIN)/uv pip compile pyproject.toml requirements-lock.in --extra inference --extra triton --extra dev \
		--python-version 3.11 --python-platform $(LOCK_PLATFORM) --generate-hashes --upgrade \
		--output-file $(LOCK)

# the installed environment equals the lock: every locked package at its version, nothing else
check-lock:
	$(BIN)/python -m tests.lockfile --check

demo: venv
	$(BIN)/nightread demo

# the suite on TEST_WORKERS processes (pytest-xdist), a test file to each at a time (module fixtures stay
# shared); TEST_WORKERS=0 runs it in this process alone
TEST_WORKERS ?= 2
test: venv
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# the render and DIMSE-edge fuzz tests with a long budget (the suite runs 60 examples per strategy)
fuzz: venv
	NIGHTREAD_FUZZ_EXAMPLES=3000 $(BIN)/python -m pytest tests/unit/test_fuzz_render.py tests/unit/test_fuzz_dimse.py -q

# benchmarks print figures (ratios measured side by side in one run); they assert nothing
bench-retrieval: venv
	$(BIN)/python -m tests.bench.retrieval

bench-receiver: venv
	$(BIN)/python -m tests.bench.receiver_memory

bench-render: venv
	$(BIN)/python -m tests.bench.render

bench-engine: venv
	$(BIN)/python -m tests.bench.engine

bench-triton: venv
	$(BIN)/python -m tests.bench.triton

# Postgres seeded with 1,000 and 1,000,000 studies (about 7 GB on disk, 10-15 min): bookkeeping, queue, cohort
bench-db: venv
	$(BIN)/python -m tests.bench.db

# the nightly over Prefect workers (a Prefect server, Orthanc, S3, Triton on loopback): 1 worker vs 2
bench-scale: venv
	$(BIN)/python -m tests.bench.scale

# the fault harness: kills, outages and a faulty PACS during nightlies on Postgres + Orthanc + S3 + Triton;
# prints figures (last lines R1, R2, R3), asserts nothing; NIGHTREAD_CHAOS_STUDIES scales it (default 20)
chaos: venv
	$(BIN)/python -m tests.chaos

# the images built and deploy/compose.yaml's stack run with podman (as root), a nightly through it, checked and
# torn down; prints each phase's time (docs/deployment.md#make-deploy-check)
deploy-check: venv
	$(BIN)/python -m tests.deploy_check

clean:
	rm -rf .nightread test-output .pytest_cache .mypy_cache .ruff_cache
