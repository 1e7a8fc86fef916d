# Creates .venv at the repository root on first use; every target sets up what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# benchmark data for the tests that read real files; those tests skip without it
NORMLAB_DATA_DIR ?= $(wildcard $(abspath ../shared/data))
export NORMLAB_DATA_DIR

.PHONY: install test verify clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: 2.13.0 is the CPU build this machine kind provides.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e .
	touch $(STAMP)

# the test extras: pytest, hypothesis, and ray and triton for the backend tests
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(TEST_STAMP)

test: $(TEST_STAMP)
	# two single-threaded workers: one per core, no oversubscription
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 -q

verify: $(STAMP)
	$(BIN)/normlab verify --quick

clean:
	rm -rf $(VENV) normlab-out .pytest_cache
