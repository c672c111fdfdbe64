# Every target runs inside .venv (created by `make install`).
# Usage: make install | make train [RECIPE=…] [ARGS="--key value …"] | make test | make lint | make bench

PYTHON  ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
RECIPE  ?= gemma3-270m-demo
ARGS    ?=
RUN     ?=
REPO    ?=
# Where there is no NVIDIA GPU, install the CPU build of torch (a plain `torch` requirement pulls several GB of CUDA).
TORCH   ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.6" || echo "torch==2.13.0")

.PHONY: install train dpo merge eval export sweep generate push test test-all test-gguf lint format bench data clean help gpu-wheels

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

install: $(BIN)/python  ## create .venv and install the project with its extras (CPU torch where there is no GPU)
	$(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e ".[demo,tune,dev]"

# Several processes (NPROC>1) go through `accelerate launch`; ACCELERATE_CONFIG is a file or the name of a shipped
# config in adapters/accelerate_configs/ (ddp, fsdp2-qlora, zero2, zero3, multi-node). Without a config on a machine
# with no GPU, --multi_gpu still starts NPROC CPU processes that form a gloo world (used by the tests).
# Several machines: run on each NPROC=<total> NODES=<machines> NODE_RANK=<0..> MAIN_ADDR=<machine 0> MAIN_PORT=<port>
# (docs/scale-out.md; scripts/slurm/train.sbatch does it under SLURM).
NPROC   ?= 1
ACCELERATE_CONFIG ?=
NODES   ?=
NODE_RANK ?=
MAIN_ADDR ?=
MAIN_PORT ?=
ACC_CFG_FILE = $(if $(ACCELERATE_CONFIG),$(if $(wildcard $(ACCELERATE_CONFIG)),$(ACCELERATE_CONFIG),adapters/accelerate_configs/$(ACCELERATE_CONFIG:.yaml=).yaml))
LAUNCH_ARGS = --num_processes $(NPROC) $(if $(ACC_CFG_FILE),--config_file $(ACC_CFG_FILE),--multi_gpu) \
	$(if $(NODES),--num_machines $(NODES)) $(if $(NODE_RANK),--machine_rank $(NODE_RANK)) $(if $(MAIN_ADDR),--main_process_ip $(MAIN_ADDR)) \
	$(if $(MAIN_PORT),--main_process_port $(MAIN_PORT))

train:  ## fine-tune: make train [RECIPE=gemma3-270m-demo] [ARGS="--max_steps 10"] [NPROC=2 [ACCELERATE_CONFIG=ddp]]
ifeq ($(NPROC)$(ACCELERATE_CONFIG),1)
	$(BIN)/adapters train $(RECIPE) $(ARGS)
else
	$(BIN)/accelerate launch $(LAUNCH_ARGS) -m adapters train $(RECIPE) $(ARGS)
endif

# The preference demo continues the newest finished SFT demo run (trains it first when there is none).
SFT_DEMO_RUN = $(BIN)/python -m adapters.training.preference latest gemma3-270m-demo
dpo:  ## preference demo: DPO continuing the SFT demo's adapter (make dpo [ARGS="--max_steps 10"])
	@run=$$($(SFT_DEMO_RUN)); \
	if [ -z "$$run" ]; then echo "[dpo] no finished gemma3-270m-demo run: training it first"; \
		$(BIN)/adapters train gemma3-270m-demo || exit $$?; run=$$($(SFT_DEMO_RUN)); fi; \
	echo "[dpo] continuing $$run"; \
	$(BIN)/adapters train gemma3-270m-dpo-demo --init_adapter $$run $(ARGS)

merge:  ## merge an adapter into a full-precision base: make merge RUN=outputs/<run>
	$(BIN)/adapters merge $(RUN) $(ARGS)

eval:  ## score a run again: make eval RUN=outputs/<run>
	$(BIN)/adapters eval $(RUN) $(ARGS)

TRIALS  ?= 3
FORMAT  ?=
export:  ## a run's adapter to a folder (ARGS="--to DIR"), or FORMAT=gguf: llama.cpp/Ollama files in <run>/gguf
	$(BIN)/adapters export $(RUN) $(if $(filter gguf,$(FORMAT)),--gguf) $(ARGS)

generate:  ## answer prompts with a run's model: make generate RUN=outputs/<run> ARGS="--prompt '...'"
	$(BIN)/adapters generate $(RUN) $(ARGS)

sweep:  ## hyperparameter search: make sweep [RECIPE=…] [TRIALS=3] [ARGS="--max_steps 10"]
	$(BIN)/adapters sweep $(RECIPE) --trials $(TRIALS) $(ARGS)

push:  ## share a run: make push RUN=outputs/<run> REPO=org/name
	$(BIN)/adapters push $(RUN) --repo-id $(REPO) $(ARGS)

bench:  ## baseline vs optimized path, same run, ratio reported
	$(BIN)/adapters bench $(ARGS)

# What a GPU machine with no registry lacks (docs/gpu.md): the versions tested here, as Python 3.12 manylinux wheels.
# pip matches manylinux_2_N exactly, hence the list of N. scripts/gpu_check.sh installs them from .whl/ offline.
GPU_WHEELS ?= trl==1.16.0 datasets==5.2.0 bitsandbytes==0.50.2 liger-kernel==0.8.5 dill==0.4.1 multiprocess==0.70.19 \
	gguf==0.19.0
gpu-wheels:  ## download the wheels scripts/gpu_check.sh installs on a GPU machine into .whl/ (and check the carry size)
	rm -rf .whl && mkdir -p .whl
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(foreach n,17 24 27 28 31 34 35,--platform manylinux_2_$(n)_x86_64) --platform manylinux2014_x86_64 \
		--platform manylinux1_x86_64 -d .whl $(GPU_WHEELS)
	@ls -1 .whl
	$(BIN)/python -m adapters.planning.gpu_check size .

data:  ## regenerate the demo dataset in data/demo/
	$(BIN)/python scripts/make_demo_data.py

test:  ## the fast test suite (CPU, no downloads)
	$(BIN)/python -m pytest -q

test-all:  ## also the slow tests (real embedded model)
	$(BIN)/python -m pytest -q -m "not gpu"

# GGML_NATIVE=OFF: a native build on a CPU with AMX crashed (SIGSEGV) on Q4_K/Q8_0 tensors in its AMX buffer here
test-gguf:  ## llama.cpp answers the exported demo run (installs the gguf-check extra: builds llama-cpp-python)
	# Built from the sdist with these flags, never from pip's wheel cache: a cached wheel may have been built with
	# other flags (a native AMX build segfaults on Q8_0/Q4_K GGUFs on these CPUs).
	CMAKE_ARGS="$${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF}" $(BIN)/pip install --no-cache-dir \
		--no-binary llama-cpp-python -e ".[gguf-check]"
	$(BIN)/python -m pytest -q -s -m gguf tests/test_gguf_llama_cpp.py

lint:
	$(BIN)/ruff check adapters scripts tests
	$(BIN)/ruff format --check adapters scripts tests

format:
	$(BIN)/ruff format adapters scripts tests
	$(BIN)/ruff check --fix adapters scripts tests

clean:
	rm -rf outputs .pytest_cache .ruff_cache
