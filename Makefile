# rynn-pipe: the whole run as make targets. `make help` lists them.
#   make demo                              # set up, then demo data -> shards -> train -> act/imagine/rollout
#   make shards SUITE=libero_long DATA=/data/libero
#   make train  SUITE=libero_long
#   make test                              # the default (fast) test run, as CI runs it

SHELL := bash
VENV   ?= .venv
PY     := $(VENV)/bin/python
RYNN   := $(VENV)/bin/rynn-pipe
SUITE  ?= demo
DATA   ?= $(if $(filter demo,$(SUITE)),out/demo/raw,data/libero)
OUT    ?= out/$(SUITE)
RUN    ?= runs/$(SUITE)
PRESET ?= tiny
STEPS  ?= 300
SET    ?=
SETS   := $(foreach s,$(SET),--set $(s))
TORCH_VERSION := 2.13.0

.PHONY: help setup demo demo-data shards plan verify inspect train act imagine eval test test-all test-reliability bench bench-gpu clean sim-experiment sim-tokens sim-train-full sim-train-vla sim-roll-full sim-roll-vla sim-roll-baselines

help:
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/'

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the local CPU build, never a CUDA build resolved by pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed ## create .venv and install (torch pinned to the CPU build)

demo-data: setup ## write the synthetic LIBERO-format demo suite to out/demo/raw
	@test -d out/demo/raw || $(RYNN) demo-data out/demo/raw

OBS := out/demo/obs
ACT := $(RYNN) act --checkpoint runs/demo/latest --instruction "$$(cat $(OBS)/instruction.txt)" \
	--state $(OBS)/state.npy --front $(OBS)/front.npy --wrist $(OBS)/wrist.npy \
	--prev-front $(OBS)/prev_front.npy --prev-wrist $(OBS)/prev_wrist.npy

demo: demo-data ## the main job on the embedded demo data: shards, training, inference, eval
	$(RYNN) tokenize --raw out/demo/raw --recipe demo --out out/demo $(SETS)
	$(RYNN) verify out/demo/shards
	$(RYNN) train --shards out/demo/shards --out runs/demo --preset tiny --steps $(STEPS)
	$(RYNN) demo-obs out/demo/raw $(OBS)
	$(ACT) --mode continuous
	$(ACT) --mode discrete
	$(RYNN) imagine --checkpoint runs/demo/latest --rollout --shards out/demo/shards --steps 2 --out runs/demo/imagine
	$(RYNN) eval --checkpoint runs/demo/latest --shards out/demo/shards --out runs/demo/eval
	$(RYNN) rollout --env demo --policy runs/demo/latest --episodes 1 --seed 1000 --procs 2 --videos 1 --out runs/demo/rollout

plan: setup ## what `make shards` would run (cache hits, work to do)
	$(RYNN) plan --raw $(DATA) --recipe $(SUITE) --out $(OUT) $(SETS)

shards: setup ## pretokenized shards for SUITE from DATA (LIBERO HDF5 or LeRobot)
	$(RYNN) tokenize --raw $(DATA) --recipe $(SUITE) --out $(OUT) $(SETS)

verify: setup
	$(RYNN) verify $(OUT)/shards

inspect: setup
	$(RYNN) inspect $(OUT)/shards --out $(OUT)/sample.png

train: setup ## train on the shards of `make shards`
	$(RYNN) train --shards $(OUT)/shards --out $(RUN) --preset $(PRESET) --steps $(STEPS)

# The closed-loop experiment (needs the [sim] extra: pip install -e '.[sim]'): robosuite Lift expert
# demos -> sim_lift shards -> two CPU trainings (VLA + world model; VLA only) -> rollouts of both in
# both action modes and of the mean / expert baselines on the same seeds -> $(EXP)/report.md.
# `make -j2 sim-experiment` trains the two arms at once, one core each (SIM_THREADS=1): on 2 cores
# that is the fastest order, and each training still gets a whole core.
EXP          ?= out/sim_experiment
SIM_DEMOS    ?= 300
SIM_NOISE    ?= 0.05
SIM_STEPS    ?= 4000
# The tiny preset's lr (1e-3) collapses the action head to one constant chunk on these demos (the
# same output for every observation, measured); 3e-4 keeps it input-dependent.
SIM_LR       ?= 3e-4
# fused AdamW and bf16 autocast: 1.9x the steps of the fp32 per-tensor-loop step in the hour
# (measured, 1 thread); cosine decay to lr/10 by the last step. A tiny checkpoint with its
# optimizer state is ~470 MB: each arm keeps its last 3.
SIM_TRAIN    ?= --set lr=$(SIM_LR) --set schedule=cosine --set model.bin_init=ordinal \
	--set adamw=fused --set precision=bf16 --set save_every=250 --set eval_every=250 \
	--set keep_last=3
SIM_THREADS  ?= 1
SIM_EPISODES ?= 50
SIM_SEED     ?= 100000
SIM_PROCS    ?= 1
SIM_VIDEOS   ?= 2
ROLLOUT = OMP_NUM_THREADS=$(SIM_THREADS) $(RYNN) rollout --env robosuite:Lift \
	--episodes $(SIM_EPISODES) --seed $(SIM_SEED) --procs $(SIM_PROCS) --shards $(EXP)/tok/shards \
	--videos $(SIM_VIDEOS)
SIM_TRAIN_CMD = OMP_NUM_THREADS=$(SIM_THREADS) $(RYNN) train --shards $(EXP)/tok/shards \
	--preset $(PRESET) --steps $(SIM_STEPS) $(SIM_TRAIN)

sim-experiment: sim-roll-full sim-roll-vla sim-roll-baselines ## robosuite Lift: demos, tokenize, train (full and VLA-only), rollouts, report
	$(RYNN) sim-report $(EXP)

sim-tokens: setup
	@$(PY) -c "import robosuite" 2>/dev/null || $(PY) -m pip install -q -e '.[sim]'
	@test -d $(EXP)/raw || $(RYNN) sim-data --env robosuite:Lift --episodes $(SIM_DEMOS) \
		--noise $(SIM_NOISE) $(EXP)/raw
	$(RYNN) tokenize --raw $(EXP)/raw --recipe sim_lift --out $(EXP)/tok
	$(RYNN) verify $(EXP)/tok/shards

sim-train-full: sim-tokens
	$(SIM_TRAIN_CMD) --out $(EXP)/runs/full

sim-train-vla: sim-tokens
	$(SIM_TRAIN_CMD) --out $(EXP)/runs/vla --set mix=1.0

sim-roll-full: sim-train-full
	$(ROLLOUT) --mode continuous --policy $(EXP)/runs/full --out $(EXP)/rollouts/full
	$(ROLLOUT) --mode discrete --policy $(EXP)/runs/full --out $(EXP)/rollouts/full-discrete

sim-roll-vla: sim-train-vla
	$(ROLLOUT) --mode continuous --policy $(EXP)/runs/vla --out $(EXP)/rollouts/vla
	$(ROLLOUT) --mode discrete --policy $(EXP)/runs/vla --out $(EXP)/rollouts/vla-discrete

# after both trainings, so that no baseline shares the CPU with a training
sim-roll-baselines: sim-train-full sim-train-vla
	$(ROLLOUT) --mode continuous --policy mean --out $(EXP)/rollouts/mean
	$(ROLLOUT) --mode continuous --policy expert --out $(EXP)/rollouts/expert

test: setup ## the default test run (fast tier; what CI runs)
	OMP_NUM_THREADS=2 $(VENV)/bin/pytest

test-all: setup ## every test, the slow tier included
	OMP_NUM_THREADS=2 $(VENV)/bin/pytest -m 'not gpu'

test-reliability: setup ## kill -9 at random moments, cache damage, concurrent exports, manifest flips (TRIALS=n)
	OMP_NUM_THREADS=2 RYNN_TRIALS=$(or $(TRIALS),10) $(VENV)/bin/pytest -m reliability

bench: setup ## speed and size benchmarks (ratios against baselines measured in the same run)
	$(PY) -m bench

bench-gpu: setup ## accelerator figures as one JSON (VQ-GAN, training MFU, inference; < 8 min)
	$(PY) -m bench --device cuda

clean:
	rm -rf out runs
