"""Recipes: sections, scopes, overrides and validation, resolved on ViT-style point names."""
from __future__ import annotations

import pytest

from vitq.quant import Kind, PointSpec, Recipe

W, LI, MM, SM, NI = Kind.WEIGHT, Kind.LINEAR_INPUT, Kind.MATMUL_INPUT, Kind.SOFTMAX_OUTPUT, Kind.NORM_INPUT

POINTS = [
    ("patch_embed.proj.input", LI),
    ("patch_embed.proj.weight", W),
    ("blocks.0.norm1.input", NI),
    ("blocks.0.attn.qkv.input", LI),
    ("blocks.0.attn.qkv.weight", W),
    ("blocks.0.attn.matmul_qk.a", MM),
    ("blocks.0.attn.matmul_qk.b", MM),
    ("blocks.0.attn.softmax.output", SM),
    ("blocks.0.attn.matmul_av.b", MM),
    ("blocks.0.attn.proj.input", LI),
    ("blocks.0.attn.proj.weight", W),
    ("blocks.0.norm2.input", NI),
    ("norm.input", NI),
    ("head.input", LI),
    ("head.weight", W),
]
KIND = dict(POINTS)


def resolve(recipe: Recipe, name: str) -> PointSpec | None:
    return recipe.resolve(name, KIND[name])


W4A8 = {"weight": {"bits": 4, "per_channel": True, "symmetric": True}, "activation": {"bits": 8}}


def test_weight_and_activation_sections():
    r = Recipe.from_config(W4A8)
    w = resolve(r, "blocks.0.attn.qkv.weight")
    assert (w.bits, w.per_channel, w.symmetric, w.observer) == (4, True, True, "minmax")
    for name in ("blocks.0.attn.qkv.input", "blocks.0.attn.matmul_qk.a", "blocks.0.attn.softmax.output"):
        a = resolve(r, name)
        assert (a.bits, a.per_channel, a.symmetric) == (8, False, False), name
    assert r.scope == "matmul" and r.name == "custom"


def test_per_kind_section_refines_activation():
    r = Recipe.from_config({
        "weight": {"bits": 8},
        "activation": {"bits": 8, "observer": "omse"},
        "softmax_output": {"bits": 4, "symmetric": True, "signed": False},
        "matmul_input": {"per_channel": True},
    })
    sm = resolve(r, "blocks.0.attn.softmax.output")
    assert (sm.bits, sm.symmetric, sm.signed, sm.observer) == (4, True, False, "omse")  # observer inherited
    mm = resolve(r, "blocks.0.attn.matmul_qk.b")
    assert (mm.bits, mm.per_channel, mm.observer) == (8, True, "omse")
    li = resolve(r, "head.input")
    assert (li.bits, li.per_channel, li.symmetric) == (8, False, False)
    # the weight section is not touched by activation sections
    assert resolve(r, "head.weight").observer == "minmax"


def test_per_kind_section_without_activation_section():
    r = Recipe.from_config({"softmax_output": {"bits": 6}})
    assert resolve(r, "blocks.0.attn.softmax.output").bits == 6
    assert resolve(r, "blocks.0.attn.qkv.input") is None
    assert resolve(r, "head.weight") is None


def test_scope_matmul_leaves_norm_inputs_float():
    r = Recipe.from_config({**W4A8, "scope": "matmul"})
    for name in ("blocks.0.norm1.input", "blocks.0.norm2.input", "norm.input"):
        assert resolve(r, name) is None
    for name, kind in POINTS:
        if kind != NI:
            assert resolve(r, name) is not None, name


def test_scope_full_quantizes_norm_inputs():
    r = Recipe.from_config({**W4A8, "scope": "full"})
    for name, _ in POINTS:
        assert resolve(r, name) is not None, name
    assert resolve(r, "blocks.0.norm1.input").bits == 8


def test_unknown_scope_lists_valid_scopes():
    with pytest.raises(ValueError, match=r"unknown scope 'fulll'.*\['full', 'linear', 'matmul'\]"):
        Recipe.from_config({**W4A8, "scope": "fulll"})


def test_overrides_last_match_wins():
    r = Recipe.from_config({**W4A8, "overrides": [{"pattern": "head.*", "bits": 8},
                                                  {"pattern": "head.weight", "bits": 6}]})
    hw, hi = resolve(r, "head.weight"), resolve(r, "head.input")
    assert hw.bits == 6 and hi.bits == 8
    assert hw.per_channel and hw.symmetric  # fields the overrides do not mention come from the section
    assert resolve(r, "blocks.0.attn.qkv.weight").bits == 4  # no match: untouched
    # reversed order: the broad pattern comes last and wins
    r = Recipe.from_config({**W4A8, "overrides": [{"pattern": "head.weight", "bits": 6},
                                                  {"pattern": "head.*", "bits": 8}]})
    assert resolve(r, "head.weight").bits == 8


def test_override_restricted_to_kind():
    r = Recipe.from_config({**W4A8, "overrides": [{"pattern": "blocks.*", "kind": "weight", "bits": 3}]})
    assert resolve(r, "blocks.0.attn.qkv.weight").bits == 3
    assert resolve(r, "blocks.0.attn.qkv.input").bits == 8
    assert resolve(r, "head.weight").bits == 4


def test_override_unknown_kind_raises():
    with pytest.raises(ValueError, match="unknown kind 'weights'"):
        Recipe.from_config({**W4A8, "overrides": [{"pattern": "head.*", "kind": "weights", "bits": 8}]})


def test_override_without_pattern_raises():
    with pytest.raises(ValueError, match=r"overrides\[1\] needs a 'pattern'"):
        Recipe.from_config({**W4A8, "overrides": [{"pattern": "head.*", "bits": 8}, {"bits": 8}]})


def test_enable_false_keeps_points_float():
    r = Recipe.from_config({**W4A8, "overrides": [{"pattern": "patch_embed.*", "enable": False}]})
    assert resolve(r, "patch_embed.proj.input") is None
    assert resolve(r, "patch_embed.proj.weight") is None
    assert resolve(r, "blocks.0.attn.qkv.input") is not None
    # a section can switch a whole kind off
    r = Recipe.from_config({**W4A8, "softmax_output": {"enable": False}})
    assert resolve(r, "blocks.0.attn.softmax.output") is None
    assert resolve(r, "blocks.0.attn.matmul_qk.a").bits == 8


def test_disabled_point_stays_disabled_under_later_bits_override():
    r = Recipe.from_config({**W4A8, "overrides": [{"pattern": "head.*", "enable": False},
                                                  {"pattern": "head.weight", "bits": 6}]})
    assert resolve(r, "head.weight") is None
    r = Recipe.from_config({**W4A8, "overrides": [{"pattern": "head.*", "enable": False},
                                                  {"pattern": "head.weight", "bits": 6, "enable": True}]})
    assert resolve(r, "head.weight").bits == 6
    assert resolve(r, "head.input") is None


def test_override_cannot_bring_out_of_scope_kind_in_without_enable():
    cfg = {**W4A8, "scope": "matmul"}
    r = Recipe.from_config({**cfg, "overrides": [{"pattern": "blocks.0.norm1.input", "bits": 4}]})
    assert resolve(r, "blocks.0.norm1.input") is None
    r = Recipe.from_config({**cfg, "overrides": [{"pattern": "blocks.0.norm1.input", "bits": 4, "enable": True}]})
    spec = resolve(r, "blocks.0.norm1.input")
    assert spec is not None and spec.bits == 4 and spec.enable
    assert resolve(r, "blocks.0.norm2.input") is None  # only the matching point
    # with enable: true and nothing else, the point gets the activation section's spec
    r = Recipe.from_config({**cfg, "overrides": [{"pattern": "*.input", "kind": "norm_input", "enable": True}]})
    assert resolve(r, "norm.input").bits == 8


def test_enable_true_on_kind_without_any_section_uses_defaults():
    r = Recipe.from_config({"weight": {"bits": 4}, "overrides": [{"pattern": "head.input", "enable": True}]})
    spec = resolve(r, "head.input")
    assert spec == PointSpec()  # 8-bit asymmetric per-tensor minmax
    assert resolve(r, "blocks.0.attn.qkv.input") is None


@pytest.mark.parametrize("cfg, where", [
    ({"weight": {"bitz": 4}}, "quant.weight"),
    ({"activation": {"bits": 8, "granularity": "per_channel"}}, "quant.activation"),
    ({"softmax_output": {"observr": "omse"}}, "quant.softmax_output"),
    ({"overrides": [{"pattern": "head.*", "bitz": 8}]}, "quant.overrides[0]"),
])
def test_unknown_keys_raise_with_valid_keys(cfg, where):
    with pytest.raises(ValueError) as e:
        Recipe.from_config(cfg)
    msg = str(e.value)
    assert where in msg
    assert "valid keys" in msg
    for key in ("bits", "symmetric", "per_channel", "observer", "enable"):
        assert key in msg


@pytest.mark.parametrize("cfg", [
    {"weight": {"bits": 1}},
    {"activation": {"bits": 17}},
    {"softmax_output": {"bits": 2.5}},
    {"weight": {"bits": 4}, "overrides": [{"pattern": "head.*", "bits": 32}]},
])
def test_bits_out_of_range_raise(cfg):
    with pytest.raises(ValueError, match="between 2 and 16"):
        Recipe.from_config(cfg)


def test_round_trip():
    cfg = {
        "name": "w4a8-custom",
        "scope": "full",
        "weight": {"bits": 4, "per_channel": True, "symmetric": True, "observer": "omse"},
        "activation": {"bits": 8, "observer": "percentile", "observer_args": {"alpha": 0.999}},
        "softmax_output": {"bits": 6, "symmetric": True, "signed": False},
        "overrides": [
            {"pattern": "head.*", "bits": 8},
            {"pattern": "patch_embed.*", "kind": "weight", "per_channel": False},
            {"pattern": "blocks.0.norm1.input", "enable": False},
        ],
    }
    r = Recipe.from_config(cfg)
    back = Recipe.from_config(r.to_config())
    assert back.name == "w4a8-custom" and back.scope == "full"
    assert back.specs == r.specs
    assert back.to_config() == r.to_config()
    for name, _ in POINTS:
        assert resolve(back, name) == resolve(r, name), name
    # spot checks of what survived
    assert resolve(back, "blocks.0.attn.qkv.input").observer_args == {"alpha": 0.999}
    assert resolve(back, "patch_embed.proj.weight").per_channel is False
    assert resolve(back, "head.weight").bits == 8 and resolve(back, "head.weight").per_channel
    assert resolve(back, "blocks.0.norm1.input") is None


def test_check_patterns():
    names, kinds = [n for n, _ in POINTS], [k for _, k in POINTS]
    Recipe.from_config({**W4A8, "overrides": [{"pattern": "head.*", "bits": 8}]}).check_patterns(names, kinds)
    r = Recipe.from_config({**W4A8, "overrides": [{"pattern": "head.*", "bits": 8},
                                                  {"pattern": "blocks.*.mlp.fc1.*", "bits": 8}]})
    with pytest.raises(ValueError) as e:
        r.check_patterns(names, kinds)
    msg = str(e.value)
    assert "'blocks.*.mlp.fc1.*'" in msg and "matches no quant point" in msg
    assert "patch_embed.proj.input" in msg  # shows what names look like
    # a pattern whose names exist but never with the requested kind is also a mistake
    r = Recipe.from_config({**W4A8, "overrides": [{"pattern": "head.*", "kind": "softmax_output", "bits": 8}]})
    with pytest.raises(ValueError, match=r"'head\.\*' \(kind softmax_output\) matches no quant point"):
        r.check_patterns(names, kinds)
    # `optional: true` marks a pattern meant for some model families only (a classifier head): matching
    # nothing is then fine, and it survives the round trip through the checkpoint's config
    r = Recipe.from_config({**W4A8, "overrides": [{"pattern": "blocks.*.mlp.fc1.*", "enable": False,
                                                   "optional": True}]})
    r.check_patterns(names, kinds)
    assert r.assign(names, kinds) and Recipe.from_config(r.to_config()).overrides == r.overrides
    with pytest.raises(ValueError, match="optional must be true or false"):
        Recipe.from_config({**W4A8, "overrides": [{"pattern": "head.*", "optional": "yes"}]})


def test_describe():
    r = Recipe.from_config({**W4A8, "scope": "full", "softmax_output": {"bits": 4}})
    assert r.describe() == "W4/A8/Attn4 full"
    assert Recipe.from_config({"weight": {"bits": 6}}).describe() == "W6/Afp matmul"


def test_omegaconf_config_is_accepted():
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create({**W4A8, "scope": "full",
                                      "overrides": [{"pattern": "head.*", "bits": 8}]})
    r = Recipe.from_config(cfg)
    assert resolve(r, "head.weight").bits == 8 and resolve(r, "head.weight").per_channel
    assert resolve(r, "norm.input").bits == 8
