"""One registry helper: every registry reports a missing name in one format, and registration works both ways."""
from __future__ import annotations

import pytest

from vitq.registry import Registry, UnknownName


def test_register_get_and_the_unknown_name_message():
    reg: Registry[int] = Registry("widget", "add one in widgets.py")
    reg.register("b", 2)

    @reg.register("a")
    def a() -> int:
        return 1

    assert reg.get("b") == 2 and reg["a"] is a and "a" in reg and reg.names() == ["b", "a"] and len(reg) == 2
    with pytest.raises(UnknownName) as e:
        reg.get("c")
    assert str(e.value) == "unknown widget 'c'; known: a, b (add one in widgets.py)"
    assert isinstance(e.value, ValueError)
    assert reg.pop("a") is a and reg.names() == ["b"]


def test_discovery_runs_before_a_miss_is_reported():
    calls = []
    reg: Registry[str] = Registry("task", discover=lambda: calls.append(reg.register("late", "x")))
    assert reg.get("late") == "x" and len(calls) == 1
    with pytest.raises(UnknownName, match=r"^unknown task 'nope'; known: late$"):
        reg.get("nope")
    with pytest.raises(UnknownName):
        reg.get("nope again")
    assert len(calls) == 1  # discovery runs once, not on every miss


@pytest.mark.parametrize("lookup, kind", [
    ("vitq.quant.quantizers:get_grid", "quantizer"),
    ("vitq.quant.observers:make_observer", "observer"),
    ("vitq.methods:get_method", "method"),
    ("vitq.engine.tasks:get_task", "task"),
    ("vitq.engine.context:STAGES", "stage"),
    ("vitq.models.registry:ADAPTERS", "model family"),
    ("vitq.methods:ADDONS", "add-on"),
    ("vitq.recipes:recipe", "recipe"),
])
def test_every_registry_speaks_one_format(lookup, kind):
    import importlib

    module, name = lookup.split(":")
    obj = getattr(importlib.import_module(module), name)
    get = obj.get if isinstance(obj, Registry) else obj
    with pytest.raises(UnknownName, match=rf"^unknown {kind} 'no-such-name'; known: \w"):
        get("no-such-name")
