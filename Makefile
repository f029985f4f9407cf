# Two commands a new user needs: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: venv allocator test demo demo-lm bench data data-images data-text clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP) allocator

# TCMalloc: XLA:CPU allocates each step's buffers afresh, and glibc's malloc page-faults
# them in again every step (1.45x on the demo). Installed with apt when root, else the
# command is printed; the entry points (moe_jax.train.main, the benchmark) preload it.
ALLOCATOR_PACKAGE := libtcmalloc-minimal4
ALLOCATOR_LIBS := 'libtcmalloc(_minimal)?\.so\.4|libjemalloc\.so\.2'

allocator:
	@if ldconfig -p 2>/dev/null | grep -q -E $(ALLOCATOR_LIBS); then \
	  echo "TCMalloc: installed (training and benchmarks preload it)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get install -y $(ALLOCATOR_PACKAGE) || (apt-get update && apt-get install -y $(ALLOCATOR_PACKAGE)) \
	    || echo "Could not install $(ALLOCATOR_PACKAGE): CPU training runs with glibc malloc (slower)."; \
	else \
	  echo "TCMalloc is not installed; CPU training is about 1.4x faster with it:"; \
	  echo "    sudo apt-get install -y $(ALLOCATOR_PACKAGE)"; \
	fi

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

# --- ViT demo: tiny ViT + Soft MoE on Fashion-MNIST -------------------------------------
# Overrides: make demo DEMO_ARGS="--config.num_train_steps=500 --config.optimizer.warmup_steps=50"
FMNIST_IDX := /usr/share/datasets/fashion-mnist
DEMO_CONFIG ?= configs/vit/fashion_mnist.py:soft_moe,tiny
DEMO_DIR ?= workdirs/demo
DEMO_ARGS ?=

# Fashion-MNIST: Debian's IDX files (apt when root), then a TFDS copy in the TFDS data dir.
# Text (debian_docs): Debian's Python and Linux reST docs (apt when root), then a TFDS copy,
# SentencePiece vocabularies of TEXT_VOCABS ids and the tokenised splits beside it.
# After a package update: make data TEXT_ARGS=--reprepare (see moe_jax/data/text_corpus.py).
TEXT_PACKAGES := python3.11-doc linux-doc-6.1
TEXT_MARKERS := /usr/share/doc/python3.11/html/_sources/contents.rst.txt /usr/share/doc/linux-doc-6.1/Documentation/index.rst.gz
TEXT_VOCABS ?= 4096,8192
TEXT_ARGS ?=

data: data-images data-text

data-images: $(STAMP)
	@if [ -f $(FMNIST_IDX)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST IDX files: $(FMNIST_IDX)"; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y dataset-fashion-mnist || (apt-get update && apt-get install -y dataset-fashion-mnist); \
	else \
	  echo "Fashion-MNIST is not installed. Install it with:"; \
	  echo "    sudo apt-get install -y dataset-fashion-mnist"; \
	  echo "or run where TFDS can download it (the trainer then does)."; \
	fi
	$(PY) -m moe_jax.data.prepare --name=fashion_mnist

data-text: $(STAMP)
	@if ls $(TEXT_MARKERS) >/dev/null 2>&1; then \
	  echo "Debian documentation text: installed"; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y $(TEXT_PACKAGES) || (apt-get update && apt-get install -y $(TEXT_PACKAGES)); \
	else \
	  echo "The text corpus is not installed. Install it with:"; \
	  echo "    sudo apt-get install -y $(TEXT_PACKAGES)"; \
	  echo "or, on a machine with network access, train on a TFDS text dataset"; \
	  echo "(--config.data.name=lm1b, c4/en:3.1.0 or wiki40b/en)."; \
	fi
	$(PY) -m moe_jax.data.text_prepare --vocab_sizes=$(TEXT_VOCABS) $(TEXT_ARGS)

demo: $(STAMP) allocator data-images
	$(PY) -m moe_jax.train.main --config=$(DEMO_CONFIG) --workdir=$(DEMO_DIR) $(DEMO_ARGS)
	$(PY) scripts/plot_curves.py $(DEMO_DIR)

# --- LM demo: tiny T5-style encoder-decoder + Switch MoE, span corruption on debian_docs ---
LM_DEMO_CONFIG ?= configs/t5/span_corruption.py:switch,tiny
LM_DEMO_DIR ?= workdirs/demo_lm
LM_DEMO_ARGS ?=

demo-lm: $(STAMP) allocator data-text
	$(PY) -m moe_jax.train.main --config=$(LM_DEMO_CONFIG) --workdir=$(LM_DEMO_DIR) $(LM_DEMO_ARGS)
	$(PY) scripts/plot_curves.py $(LM_DEMO_DIR)

bench: $(STAMP) allocator
	$(PY) scripts/benchmark_layers.py --out benchmarks --ablation $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
