"""docs/adding.md, executed: every Python block runs in order, then each promise is checked."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import timm
import torch
from hydra import compose, initialize_config_dir

import vitq
from vitq.engine.run import run
from vitq.registry import Registry
from vitq.quant import Recipe, iter_points

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "adding.md").read_text()

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def doc():
    """The namespace after executing every ```python block of docs/adding.md."""
    namespace: dict = {}
    for block in re.findall(r"```python\n(.*?)```", DOC, flags=re.S):
        exec(compile(block, "docs/adding.md", "exec"), namespace)  # noqa: S102
    yield namespace
    from vitq.engine.tasks import TASKS
    from vitq.methods import METHODS
    from vitq.models.registry import ADAPTERS
    from vitq.quant.quantizers import GRIDS

    METHODS.pop("shrink", None), GRIDS.pop("pow2_uniform", None), TASKS.pop("blobs", None)
    ADAPTERS.pop("tiny")


def _vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1).eval()


def test_method_shrinks_every_activation_scale(doc):
    x = torch.randn(8, 3, 32, 32)
    base = vitq.quantize(_vit(), {**{k: v for k, v in doc["recipe"].items() if k != "factor"}, "method": "ptq"})
    shrunk = vitq.quantize(_vit(), doc["recipe"])
    for q in (base, shrunk):
        vitq.calibrate(q, lambda m: m(x))
    a, b = dict(iter_points(base)), dict(iter_points(shrunk))
    for name, p in a.items():
        if p.configured and p.kind != "weight":
            assert torch.allclose(b[name].quantizer.scale, 0.5 * p.quantizer.scale), name
        elif p.configured:
            assert torch.equal(b[name].quantizer.scale, p.quantizer.scale), name


def test_method_yaml_composes_with_its_option(doc, tmp_path):
    yaml = re.search(r"```yaml\n(# src/vitq/conf/quant/shrink.yaml.*?)```", DOC, flags=re.S).group(1)
    quant = tmp_path / "quant"
    shutil.copytree(ROOT / "src" / "vitq" / "conf" / "quant" / "base", quant / "base")
    (quant / "shrink.yaml").write_text(yaml)
    from omegaconf import OmegaConf

    from vitq.recipes import _load

    recipe = Recipe.from_config(OmegaConf.to_container(_load(quant / "shrink.yaml"), resolve=True))
    assert recipe.method == "shrink" and recipe.options["factor"] == 0.9
    assert recipe.options["noisy"] is False  # add-on switches (NoisyQuant) join every method's options


def test_grid_steps_are_powers_of_two_and_search_scores_it(doc):
    x = torch.randn(8, 3, 32, 32)
    for observer in ("minmax", "omse"):
        q = vitq.quantize(_vit(), {"scope": "matmul", "weight": {"bits": 8, "per_channel": True},
                                   "activation": {"bits": 8, "quantizer": "pow2_uniform", "observer": observer}})
        vitq.calibrate(q, lambda m: m(x))
        grids = [p.quantizer for _, p in iter_points(q) if p.configured and p.kind == "linear_input"]
        assert grids and all(type(g).__name__ == "Pow2UniformQuantizer" for g in grids)
        for g in grids:
            assert torch.equal(g.scale, torch.exp2(torch.round(torch.log2(g.scale)))), observer


def test_family_adapter_with_repq_fold(doc):
    torch.manual_seed(0)
    model = doc["TinyTransformer"]().eval()
    x = torch.randn(16, 5, 8)
    per_channel = vitq.quantize(model, vitq.recipe("repq", reparameterize=False, weight=None, overrides=[]), inplace=False)
    folded = vitq.quantize(model, vitq.recipe("repq", weight=None, overrides=[], fold_zero_point="rounded"), inplace=False)
    for q in (per_channel, folded):
        vitq.calibrate(q, lambda m: m(x))
    assert [n for n, _ in vitq.models.units(folded)] == ["embed", "blocks.0", "blocks.1", "head"]
    assert folded.blocks[0].fc.input_quantizer.quantizer.scale.numel() == 1  # folded to per tensor
    assert per_channel.blocks[0].fc.input_quantizer.quantizer.scale.numel() == 16
    with torch.no_grad():
        assert torch.allclose(per_channel(x), folded(x), atol=1e-5)


def test_task_runs_through_the_engine(doc, tmp_path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[
            "task.name=blobs", "model.kwargs.img_size=16", "model.kwargs.patch_size=4", "model.kwargs.depth=1",
            "model.kwargs.embed_dim=32", "model.kwargs.num_heads=2", "task.fit.epochs=20", "quant=minmax",
            "quant.calib.num_samples=50", "logger=none", f"paths.cache_dir={tmp_path / 'cache'}"])
    row = run(cfg, tmp_path / "out")
    assert row["task"] == "blobs" and row["eval_samples"] == 100
    assert row["fp_top1"] >= 90.0  # the squares are easy: measured 100.0 after 20 epochs
    assert row["quant_top1"] >= 90.0


def test_task_finetunes_through_its_hooks(doc, tmp_path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[
            "task.name=blobs", "model.kwargs.img_size=16", "model.kwargs.patch_size=4", "model.kwargs.depth=1",
            "model.kwargs.embed_dim=32", "model.kwargs.num_heads=2", "task.fit.epochs=20", "quant=minmax",
            "quant.w_bits=4", "quant.a_bits=4", "quant.calib.num_samples=50", "logger=none",
            "quant.finetune.epochs=2", "quant.finetune.val_samples=50", f"paths.cache_dir={tmp_path / 'cache'}"])
    row = run(cfg, tmp_path / "out")
    assert row["finetune_epochs"] == 2 and row["setting"].endswith("+finetune 2 ep")
    assert row["finetune_val_kd"] >= 0 and row["finetune_val_task"] > 0  # both terms reached the validation loop


PLUGINS: Registry[int] = Registry("plugin")  # filled by the throw-away package's modules below


def test_a_new_file_in_the_package_folder_is_all_it_takes(tmp_path):
    """Adding a method is its file plus its YAML: `vitq.methods` and `vitq.models` import every module in
    their folder, so no `__init__` names them (checked on the real packages and on a new package)."""
    import sys

    import vitq.methods
    import vitq.models
    from vitq.registry import import_modules

    for package in (vitq.methods, vitq.models):
        folder = Path(package.__path__[0])
        assert {f"{package.__name__}.{p.stem}" for p in folder.glob("*.py") if p.stem != "__init__"} <= set(sys.modules)
    pkg = tmp_path / "plugins"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "one.py").write_text("from test_adding import PLUGINS\nPLUGINS.register('one', 1)\n")
    (pkg / "two.py").write_text("from test_adding import PLUGINS\nPLUGINS.register('two', 2)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        assert import_modules("plugins", [str(pkg)]) == ["one", "two"]
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("plugins", "plugins.one", "plugins.two"):
            sys.modules.pop(name, None)
    assert PLUGINS.get("one") == 1 and PLUGINS.get("two") == 2
    assert isinstance(PLUGINS, Registry)
