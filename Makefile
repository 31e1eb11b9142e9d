# Each target sets up .venv on first use (plain pip; torch/torchvision resolve from the local wheel cache).
# The `det` extra (mmdet, mmengine, pycocotools) needs mmcv with compiled ops, which the package index has
# only as source: scripts/install_mmcv.sh builds it once (about 13 minutes on 2 cores) and caches the
# wheel per torch and Python version in ~/.cache/vitq/wheels (VITQ_WHEEL_CACHE), so later set-ups take seconds.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: setup train test test-slow bench clean

$(STAMP): pyproject.toml scripts/install_mmcv.sh
	python3 -m venv .venv
	$(PY) -m pip install -e ".[dev,export,det,slurm]"
	bash scripts/install_mmcv.sh $(PY)
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
