# Region-level SSL pipeline. Every target builds .venv first (idempotent).
# Variables: DATASET (sample|coco|imagenet|folder), COCO_ROOT, DATA_ROOT, SPLIT, WORK_DIR.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
WORK_DIR ?= work
DATASET ?= sample
DATASETS ?= $(DATASET)
export WORK_DIR PYTHONPATH := $(CURDIR)
# $(call q,VALUE): VALUE as one shell word, whatever it holds (NAME="x<b>y", paths with
# spaces or quotes). The *_ARGS variables stay unquoted on purpose: they are lists of words.
q = '$(subst ','\'',$(1))'

REQ_STAMP := $(VENV)/.req-$(shell cat requirements.txt | sha1sum | cut -c1-12)
BENCH_STAMP := $(VENV)/.bench-$(shell cat requirements-bench.txt | sha1sum | cut -c1-12)

.PHONY: setup setup-bench test demo sample proposals shards verify stats report pretrain \
        bench bench-preprocess bench-shards bench-stats bench-report bench-loader bench-train bench-methods clean \
        gpu-check eval bench-learn bench-learn-samples

setup: $(REQ_STAMP)
$(REQ_STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	@rm -f $(VENV)/.req-* && touch $@

setup-bench: $(BENCH_STAMP)
$(BENCH_STAMP): requirements-bench.txt $(REQ_STAMP)
	$(PY) -m pip install -q -r requirements-bench.txt
	@rm -f $(VENV)/.bench-* && touch $@

test: setup
	$(PY) -m pytest

# The main job end to end on the built-in sample.
demo: setup
	$(MAKE) proposals DATASET=sample
	$(MAKE) shards DATASET=sample
	$(MAKE) verify DATASET=sample
	$(MAKE) pretrain DATASET=sample PRETRAIN_ARGS="train.steps=$(DEMO_STEPS) $(PRETRAIN_ARGS)"
	$(MAKE) report DATASETS=sample NAME=demo
	$(MAKE) eval RUN=$(WORK_DIR)/pretrain/$(basename $(notdir $(PRETRAIN_CONFIG))) EVAL_DATASET=sample \
	  EVAL_ARGS="--levels res4 res5 $(EVAL_ARGS)"
DEMO_STEPS ?= 20

# SAMPLE_ARGS e.g. "--scene 200 --object 50 --seed 1"
sample: setup
	$(PY) -m preprocess.sample --out $(call q,$(WORK_DIR)/sample/raw) $(SAMPLE_ARGS)

# make proposals DATASET=coco COCO_ROOT=/data/coco [SPLIT=train2017] | DATASET=imagenet|folder
# DATA_ROOT=... | DATASET=filelist FILE_LIST=paths.txt|paths.parquet [DATA_ROOT=base of relative paths]
# DATA_ROOT=... ; PROPOSALS_ARGS e.g. "--mode quality --num-cpus 8 --limit 100";
# PROPOSALS_ARGS=--refresh-changed redoes the parts whose source images changed since
# (what make shards asks for when it finds one). One job per WORK_DIR/DATASET at a time.
proposals: setup
	$(PY) -m preprocess.job --dataset $(call q,$(DATASET)) \
	  $(if $(filter coco,$(DATASET)),$(if $(COCO_ROOT),--root $(call q,$(COCO_ROOT)))) \
	  $(if $(filter imagenet folder filelist,$(DATASET)),$(if $(DATA_ROOT),--root $(call q,$(DATA_ROOT)))) \
	  $(if $(filter filelist,$(DATASET)),$(if $(FILE_LIST),--file-list $(call q,$(FILE_LIST)))) \
	  $(if $(SPLIT),--split $(call q,$(SPLIT))) $(PROPOSALS_ARGS)

shards: setup
	$(PY) -m shards.write --dataset $(call q,$(DATASET)) $(SHARDS_ARGS)

verify: setup
	$(PY) -m shards.verify --dataset $(call q,$(DATASET)) $(VERIFY_ARGS)

# Audit (issues 4, 18; preprocess/audit/): distance statistic into existing parts, then the report.
# WEIGHTS=path/resnet50-0676ba61.pth (else the torch hub cache); STATS_ARGS e.g. --force.
# BACKBONE= another network: work/pretrain/<run> (export or checkpoint of ours) or
# timm:<name> with WEIGHTS=<local file>; default torchvision's supervised ResNet-50.
stats: setup
	$(PY) -m preprocess.audit.stats --dataset $(call q,$(DATASET)) $(if $(WEIGHTS),--weights $(call q,$(WEIGHTS))) $(if $(BACKBONE),--backbone $(call q,$(BACKBONE))) $(STATS_ARGS)

# make report DATASETS="coco imagenet" [NAME=...] -> $(WORK_DIR)/report/NAME/{index.html,img/}
# REPORT_ARGS e.g. "--no-gallery --top 6 --gallery-sample 8".
report: setup
	$(PY) -m preprocess.audit.report --datasets $(call q,$(DATASETS)) $(if $(NAME),--name $(call q,$(NAME))) $(REPORT_ARGS)

# Short SoCo run on CPU on $(WORK_DIR)/$(DATASET)/shards, then export (issue 6). NPROC=2 runs
# torchrun with 2 processes; PRETRAIN_CONFIG picks another recipe; PRETRAIN_ARGS e.g.
# "train.steps=50 optim.base_lr=0.5". Output: $(WORK_DIR)/pretrain/<config name>/.
PRETRAIN_CONFIG ?= train/configs/soco_small_cpu.yaml
NPROC ?= 1
pretrain: setup
	$(if $(filter-out 1,$(NPROC)),$(PY) -m torch.distributed.run --standalone --nproc-per-node $(NPROC),$(PY)) \
	  train/pretrain.py --config $(call q,$(PRETRAIN_CONFIG)) $(call q,data.shards=$(WORK_DIR)/$(DATASET)/shards) \
	  $(call q,train.out=$(WORK_DIR)/pretrain/$(basename $(notdir $(PRETRAIN_CONFIG)))) $(PRETRAIN_ARGS)

# Probes of a run against random init (issue 11): kNN + linear, image + object level, every
# level, 95% bootstrap CIs -> $(WORK_DIR)/eval/<name>/{summary.json,index.html}.
# EVAL_DATASET=sample evaluates on $(WORK_DIR)/sample/shards (split by key); EVAL_ARGS e.g.
# "--train A/shards --test B/shards", "--checkpoint --target", "--levels res4 res5".
eval: setup
	@test -n "$(RUN)" || { echo "make eval: set RUN=work/pretrain/<name> (a run folder of make pretrain)" >&2; exit 2; }
	$(PY) -m train.evaluate "$(RUN)" $(if $(EVAL_DATASET),--dataset $(EVAL_DATASET)) $(EVAL_ARGS)

# Does every small recipe learn? (issue 11) Builds a 384-image training sample (seed 0, half of
# it object-centric) and a 128-image test sample (seed 1) under $(WORK_DIR) once, pretrains each
# method, probes it against random init -> bench/results/learn.json. Long (~55 min on 2 idle cores).
LEARN_TRAIN_ARGS ?= --scene 192 --object 192 --seed 0
LEARN_TEST_ARGS ?= --scene 96 --object 32 --seed 1
# bench-learn-samples' further samples (seeds 2, 3, 4 appended)
LEARN_FURTHER_ARGS ?= --scene 96 --object 32
# $(call build_samples,"NAME|preprocess.sample args" ...): each built-in sample under $(WORK_DIR)
# through preprocessing and shards, once (skipped when its shards exist).
build_samples = for spec in $(1); do \
	  name=$${spec%%|*}; args=$${spec\#*|}; \
	  test -f $(WORK_DIR)/$$name/shards/manifest.json && continue; \
	  $(PY) -m preprocess.sample --out $(WORK_DIR)/$$name/raw $$args && \
	  $(PY) -m preprocess.job --dataset sample --root $(WORK_DIR)/$$name/raw --name $$name && \
	  $(PY) -m shards.write --dataset $$name || exit 1; \
	done
bench-learn: setup
	@$(call build_samples,"sample_learn384|$(LEARN_TRAIN_ARGS)" "sample_eval|$(LEARN_TEST_ARGS)")
	$(PY) -m bench.learn --train-shards $(WORK_DIR)/sample_learn384/shards \
	  --test-shards $(WORK_DIR)/sample_eval/shards $(BENCH_LEARN_ARGS)

# The same, each run also probed on three more held-out samples (seeds 2, 3, 4): how much of a
# row is its one test sample. BENCH_LEARN_ARGS picks methods, e.g. '--methods soco'.
bench-learn-samples: setup
	@$(call build_samples,"sample_learn384|$(LEARN_TRAIN_ARGS)" "sample_eval|$(LEARN_TEST_ARGS)" \
	  "sample_seed2|$(LEARN_FURTHER_ARGS) --seed 2" "sample_seed3|$(LEARN_FURTHER_ARGS) --seed 3" \
	  "sample_seed4|$(LEARN_FURTHER_ARGS) --seed 4")
	$(PY) -m bench.learn --train-shards $(WORK_DIR)/sample_learn384/shards \
	  --test-shards $(WORK_DIR)/sample_eval/shards \
	  --also-test $(WORK_DIR)/sample_seed2/shards $(WORK_DIR)/sample_seed3/shards $(WORK_DIR)/sample_seed4/shards \
	  --out bench/results/learn_samples.json --merge $(BENCH_LEARN_ARGS)

bench: bench-preprocess bench-shards bench-stats bench-loader bench-train bench-methods

bench-preprocess: setup setup-bench
	$(PY) -m bench.preprocess

bench-shards: setup
	$(PY) -m bench.shards

bench-stats: setup
	$(PY) -m bench.stats

# Report cost with and without the gallery (issue 18) -> bench/results/report.json
bench-report: setup
	$(PY) -m bench.report

# Loader images/s per CPU core, every recipe, DALI (CPU) vs the torchvision reference and the
# DALI decode+crop bound; peak memory (issue 5). BENCH_LOADER_ARGS e.g. --samples 256 --rounds 2.
bench-loader: setup
	$(PY) -m bench.loader $(BENCH_LOADER_ARGS)

# SoCo small config on CPU: steps/s, data-wait share, forward/backward/optimiser split (issue 6).
bench-train: setup
	$(PY) -m bench.train $(BENCH_TRAIN_ARGS)

# Step time of every method's small CPU config as ratios to MoCo v2 (issue 7).
bench-methods: setup
	$(PY) -m bench.methods $(BENCH_METHODS_ARGS)

clean:
	rm -rf $(WORK_DIR)

# The GPU path on a lent GPU machine (issue 17): builds .venv itself (no `setup`: on a machine
# without a GPU it prints one line and does nothing), at most ~8 minutes, writes
# bench/results/gpu.json. GPU_CHECK_ARGS e.g. "--python python3" (use that interpreter as is),
# "--wheels DIR" (offline install), "--only venv,train".
GPU_CHECK_PYTHON ?= $(shell command -v $(PYTHON) || command -v python3)
gpu-check:
	@$(GPU_CHECK_PYTHON) -m bench.gpu_check $(GPU_CHECK_ARGS)
