# dubflow: `make demo` sets everything up and dubs the demo episode; `make test` runs the suite (`make test-fast` skips the slow tests).
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
EXTRAS ?= cpu-all,bind,test,ops
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup system demo test test-fast lint format schema bench clean server server-stop deploy worker workers

setup: system $(VENV)/.installed

system:  ## ffmpeg (with ffprobe) and espeak-ng from apt, when missing
	@command -v ffmpeg >/dev/null && command -v ffprobe >/dev/null && command -v espeak-ng >/dev/null || \
	  { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq ffmpeg espeak-ng; }

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0   # the CPU build on these machines (see README)
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	# pyannote/segmentation (MIT) for diarisation: the only file we use from whisperx's wheel; its own
	# dependencies pin torch 2.8, so it goes in without them and is never imported (tasks/diarise/segmentation.py)
	$(BIN)/pip install -q --no-deps whisperx==3.8.6
	$(BIN)/pip install -q --no-deps spandrel==0.4.2   # its torchvision has no CPU build here (README: Enhancement)
	touch $@

demo: setup
	$(BIN)/dubflow demo

test: setup  ## everything, the slow end-to-end and server tests included
	$(BIN)/python -m pytest -q

test-fast: setup  ## the quick loop: no end-to-end flows, servers or workers (pytest -m "not slow")
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

schema: setup
	$(BIN)/dubflow schema

bench: setup
	$(BIN)/python bench/cache.py

# ---- operations (README: Operations) --------------------------------------------------------------
POOL ?= dub-cpu
API  ?= http://127.0.0.1:4200/api

server: setup  ## Prefect server on PostgreSQL (DB=sqlite: SQLite); HOST=addr listens there, with auth on; prints the UI address
	PYTHON=$(BIN)/python $(if $(HOST),DUBFLOW_SERVER_HOST=$(HOST),) scripts/server.sh start $(if $(filter sqlite,$(DB)),--sqlite,)

server-stop:
	PYTHON=$(BIN)/python scripts/server.sh stop

deploy: setup  ## register prefect.yaml (nightly dub_batch, rerun-failed, episode) and its work pools
	PREFECT_API_URL=$${PREFECT_API_URL:-$(API)} PYTHON=$(BIN)/python scripts/deploy.sh

worker: setup  ## a Prefect worker for POOL (dub-cpu, or dub-gpu: one per GPU, CUDA_VISIBLE_DEVICES=i LIMIT=1)
	PREFECT_API_URL=$${PREFECT_API_URL:-$(API)} DUBFLOW_ROOT=$(CURDIR) \
	  $(BIN)/prefect worker start --pool $(POOL) $(if $(LIMIT),--limit $(LIMIT),)

workers: setup  ## long-lived render workers, one per GPU (CPU=N for CPU workers)
	$(BIN)/dubflow workers start $(if $(CPU),--cpu $(CPU),)

clean:
	rm -rf dubflow-work manifests/demo-media
