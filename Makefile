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

.PHONY: help setup demo demo-data shards plan verify inspect train act imagine eval test test-all test-reliability bench bench-gpu clean sim-experiment

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
# demos -> sim_lift shards -> two CPU trainings (VLA + world model; VLA only) -> rollouts of both and
# of the mean / expert baselines on the same seeds -> $(EXP)/report.md. SIM_STEPS ~ 1 h on 2 cores.
EXP          ?= out/sim_experiment
SIM_DEMOS    ?= 100
SIM_NOISE    ?= 0.05
SIM_STEPS    ?= 3000
# The tiny preset's lr (1e-3) collapses the action head to one constant chunk on these demos (the
# same output for every observation, measured); 3e-4 keeps it input-dependent.
SIM_LR       ?= 3e-4
SIM_EPISODES ?= 50
SIM_SEED     ?= 100000
SIM_PROCS    ?= 1
SIM_VIDEOS   ?= 2
ROLLOUT = $(RYNN) rollout --env robosuite:Lift --episodes $(SIM_EPISODES) --seed $(SIM_SEED) \
	--mode continuous --procs $(SIM_PROCS) --shards $(EXP)/tok/shards --videos $(SIM_VIDEOS)

sim-experiment: setup ## robosuite Lift: demos, tokenize, train (full and VLA-only), rollouts, report
	@$(PY) -c "import robosuite" 2>/dev/null || $(PY) -m pip install -q -e '.[sim]'
	@test -d $(EXP)/raw || $(RYNN) sim-data --env robosuite:Lift --episodes $(SIM_DEMOS) \
		--noise $(SIM_NOISE) $(EXP)/raw
	$(RYNN) tokenize --raw $(EXP)/raw --recipe sim_lift --out $(EXP)/tok
	$(RYNN) verify $(EXP)/tok/shards
	$(RYNN) train --shards $(EXP)/tok/shards --out $(EXP)/runs/full --preset $(PRESET) --steps $(SIM_STEPS) \
		--set lr=$(SIM_LR)
	$(RYNN) train --shards $(EXP)/tok/shards --out $(EXP)/runs/vla --preset $(PRESET) --steps $(SIM_STEPS) \
		--set lr=$(SIM_LR) --set mix=1.0
	$(ROLLOUT) --policy $(EXP)/runs/full --out $(EXP)/rollouts/full
	$(ROLLOUT) --policy $(EXP)/runs/vla --out $(EXP)/rollouts/vla
	$(ROLLOUT) --policy mean --out $(EXP)/rollouts/mean
	$(ROLLOUT) --policy expert --out $(EXP)/rollouts/expert
	$(RYNN) sim-report $(EXP)

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
