# Each target sets up .venv on first use (plain pip; torch/torchvision resolve from the local wheel cache).
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: setup train test test-slow bench clean

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -e ".[dev,export,det,slurm]"
	touch $(STAMP)

setup: $(STAMP)

train: $(STAMP)
	$(PY) train.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(ARGS)

bench: $(STAMP)
	$(PY) -m bench.run $(ARGS)

clean:
	rm -rf outputs multirun wandb .pytest_cache
