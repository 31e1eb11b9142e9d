# Each target sets up .venv on first use (plain pip, about 2 minutes; torch/torchvision resolve from the
# local wheel cache). The `det` extra brings mmdet with mmcv-lite, mmcv's Python package without compiled
# ops: vitq provides the RoIAlign and NMS kernels that its detectors call through torchvision
# (src/vitq/mmcv_kernels.py, docs/coco.md). `make mmcv` swaps in the compiled mmcv instead (opt-in:
# a 17 to 26 minute build on 2 cores, cached per torch and Python version in ~/.cache/vitq/wheels).
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: setup mmcv train test test-slow bench clean

$(STAMP): pyproject.toml
	python3 -m venv .venv
	rm -rf vitq.egg-info  # metadata left by the layout before tasks/ became vitq.tasks: it hides the entry points
	$(PY) -m pip install -e ".[dev,export,det,slurm]"
	touch $(STAMP)

setup: $(STAMP)

mmcv: $(STAMP)
	bash scripts/install_mmcv.sh $(PY)

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
