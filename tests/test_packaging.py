"""How vitq installs: tasks/ as the package `vitq.tasks`, declared as entry points, no top-level `tasks`."""
from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points


def test_the_built_in_tasks_are_vitq_tasks_entry_points():
    declared = {ep.name: ep.value for ep in entry_points(group="vitq.tasks")}
    assert declared == {"classification": "vitq.tasks.classification", "coco": "vitq.tasks.coco"}


def test_the_registry_finds_tasks_through_the_entry_points_in_a_fresh_process(tmp_path):
    # a fresh interpreter, away from the checkout: the registry loads the entry points on its first lookup
    code = ("from vitq.engine.tasks import get_task; import sys; "
            "print(get_task('coco').__module__, get_task('mnist').__module__, 'tasks' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["vitq.tasks.coco", "vitq.tasks.classification.task", "False"]


def test_no_top_level_tasks_module_is_installed(tmp_path):
    code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('tasks') is not None)"
    assert subprocess.run([sys.executable, "-c", code], cwd=tmp_path, timeout=120).returncode == 0


def test_metadata_without_the_entry_points_is_named(monkeypatch, caplog):
    """An install whose metadata declares no tasks (an egg-info left by the layout before `vitq.tasks`)
    says where that metadata is and how to fix it, instead of only 'unknown task'."""
    import pytest

    from vitq.engine import tasks
    from vitq.registry import UnknownName

    monkeypatch.setattr(tasks, "entry_points", lambda group: [])
    monkeypatch.setattr(tasks.TASKS, "_discovered", False)  # restored afterwards: later lookups discover for real
    with caplog.at_level("WARNING", logger="vitq.engine.tasks"), pytest.raises(UnknownName, match="reinstall"):
        tasks.get_task("no-such-task")
    assert "no vitq.tasks entry points are declared" in caplog.text and "vitq.egg-info" in caplog.text


def test_every_package_folder_is_listed_in_pyproject():
    """setuptools takes `packages` literally: a package folder missing from it is left out of a wheel (an
    editable install would still find it, so only this check catches it)."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root / "src").parts) for p in (root / "src").rglob("__init__.py")}
    found |= {".".join(("vitq", *p.parent.relative_to(root).parts)) for p in (root / "tasks").rglob("__init__.py")}
    assert found == listed
