# Entry points for people and CI. Both targets first bring .venv up to date (quick when it is).
PY := .venv/bin/python

# No model hub on these machines; vLLM's CPU backend needs an explicit KV-cache size (GiB).
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export VLLM_NO_USAGE_STATS ?= 1
export TOKENIZERS_PARALLELISM ?= false

DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup demo test

setup:
	bash scripts/setup.sh

demo: setup
	VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-4} $(PY) examples/medusa_vs_plain.py $(DEMO_ARGS)

test: setup
	VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-1} $(PY) -m pytest -q tests $(PYTEST_ARGS)
