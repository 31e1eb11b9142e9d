"""Built-in recipes from plain Python: the YAML files Hydra composes, read without Hydra."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import vitq
from vitq.quant import Recipe

ROOT = Path(__file__).resolve().parents[1]


def test_recipes_lists_every_yaml():
    names = vitq.recipes()
    assert names == sorted(p.stem for p in (ROOT / "src" / "vitq" / "conf" / "quant").glob("*.yaml"))
    assert {"fqvit", "repq", "minmax", "omse", "percentile", "ema", "fp32"} <= set(names)


@pytest.mark.parametrize("name", ["fqvit", "repq", "minmax", "omse", "fp32"])
def test_plain_python_recipe_equals_the_hydra_composed_one(name):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"quant={name}", "quant.w_bits=6", "quant.a_bits=6"])
    composed = Recipe.from_config(OmegaConf.to_container(cfg.quant, resolve=True))
    assert vitq.recipe(name, w_bits=6, a_bits=6).to_config() == composed.to_config()


def test_recipe_overrides_and_errors():
    r = vitq.recipe("repq", w_bits=6, a_bits=6, reparameterize=False)
    assert r.specs["weight"].bits == 6 and r.specs["softmax_output"].bits == 6 and r.options["reparameterize"] is False
    assert vitq.recipe("minmax", **{"calib.num_samples": 8}).name == "minmax"
    with pytest.raises(ValueError, match="unknown recipe 'nope'.*fqvit"):
        vitq.recipe("nope")
    with pytest.raises(ValueError, match="recipe 'repq' has no key 'bogus'"):
        vitq.recipe("repq", bogus=1)
    with pytest.raises(ValueError, match="quant.ptf must be true or false"):
        vitq.recipe("fqvit", ptf="yes")
    with pytest.raises(ValueError, match="between 2 and 16"):
        vitq.recipe("repq", w_bits=1)


def test_quantize_takes_a_recipe_name():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1)
    q = vitq.quantize(model, "fqvit")
    assert q.vitq.recipe.name == "fqvit" and q.vitq.recipe.method == "fqvit"
