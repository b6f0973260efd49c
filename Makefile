# regmean-pipeline: every target creates .venv and installs what it needs by itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Used only when the venv has no torch yet (a plain `pip install torch` may pull a multi-GB CUDA build).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
DEMO_DIR ?= outputs/demo
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test demo bench bench-gpu clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	@rm -f $(VENV)/.installed-* && touch $@

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	@echo "== 1/3 two tiny candidates and their task data (local, random init)"
	$(PY) -c "from regmean_pipeline.testing import *; \
	[save_model(make_model('bert', seed=s), '$(DEMO_DIR)/models/task_' + n) for s, n in ((1, 'a'), (2, 'b'))]; \
	[write_text_task('$(DEMO_DIR)/data/task_' + n + '.jsonl', n=128, seed=s) for s, n in ((1, 'a'), (2, 'b'))]"
	@echo "== 2/3 regmean stats, once per candidate"
	$(VENV)/bin/regmean stats --model $(DEMO_DIR)/models/task_a --dataset $(DEMO_DIR)/data/task_a.jsonl --out $(DEMO_DIR)/outputs/task_a --overwrite
	$(VENV)/bin/regmean stats --model $(DEMO_DIR)/models/task_b --dataset $(DEMO_DIR)/data/task_b.jsonl --out $(DEMO_DIR)/outputs/task_b --overwrite
	@echo "== 3/3 regmean merge"
	$(VENV)/bin/regmean merge --cache-dir $(DEMO_DIR)/outputs --out $(DEMO_DIR)/merged --overwrite
	@echo "merged model: $(DEMO_DIR)/merged (report: $(DEMO_DIR)/merged/merge_report.json)"

# CPU benchmark side by side with FusionBench (bench/run.py; minutes). bench-gpu: one CUDA GPU.
BENCH_STAMP := $(VENV)/.bench-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test,bench]"
	@rm -f $(VENV)/.bench-* && touch $@

bench: $(BENCH_STAMP)
	$(PY) -m bench.run --report outputs/bench/table.md

bench-gpu: $(STAMP)
	$(PY) -m bench.gpu --out outputs/bench/gpu.md

clean:
	rm -rf $(VENV) outputs .pytest_cache
