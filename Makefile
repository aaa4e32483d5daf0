# nightread: `make demo` runs the main job on embedded defaults; `make test` runs the tests.
# Both create and reuse a virtual environment at .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first, from the versions this project is tested with (override on other machines/GPUs)
TORCH_PACKAGES ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1

.PHONY: venv demo test lint clean fuzz bench-retrieval bench-triton bench-engine bench-render bench-receiver

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PACKAGES)
	$(BIN)/python -m pip install -q -e ".[inference,triton,dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/nightread demo

test: venv
	$(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# the render fuzz test with a long budget (the suite runs 60 examples)
fuzz: venv
	NIGHTREAD_FUZZ_EXAMPLES=3000 $(BIN)/python -m pytest tests/unit/test_fuzz_render.py -q

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

clean:
	rm -rf .nightread test-output .pytest_cache .mypy_cache .ruff_cache
