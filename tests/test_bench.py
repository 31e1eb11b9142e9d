"""The benchmark's loop over its sections: every section renders from results.json, and `--only report`
rewrites the page and the README table without measuring anything."""
from __future__ import annotations

import json

import pytest

from bench import run
from bench.common import cell


def _row(label: str, quant: float, delta: float, ci: list[float]) -> dict:
    return {"label": label, "fp_top1": 52.9, "fp_top5": 90.0, "eval_samples": 1000, "quant_top1": quant,
            "delta_top1": delta, "delta_top1_ci": ci}


DATA = {"accuracy": {"mnist": [_row("minmax-w4a4", 12.345, -1.5, [-2.0, -1.0])]},
        "quickstart": [{"run": "first run", "seconds": 99.6}]}


def test_cell_format() -> None:
    assert cell(_row("x", 12.345, -1.5, [-2.0, -1.0])) == "12.35 (-1.50 [-2.00, -1.00])"
    assert cell(None) == "–"


def test_report_has_each_measured_section_only() -> None:
    text = run.write_report(DATA, ["--only", "report"])
    lines = text.splitlines()
    assert "## vit_mnist on mnist" in lines
    assert "| minmax | – | – | 12.35 (-1.50 [-2.00, -1.00]) |" in lines  # W8A8, W6A6 not measured
    assert "| first run | 100 |" in lines
    for absent in ("## Block reconstruction", "## FQ-ViT ablation", "## DeiT-S speed", "## COCO detector",
                   "## Fidelity", "## Quantization-aware finetuning", "## Liu et al."):
        assert not any(line.startswith(absent) for line in lines), absent


def test_only_names_are_unique_and_parsed() -> None:
    assert len(run.ONLY) == len(set(run.ONLY))
    for name in run.ONLY:
        assert run.parse_args(["--only", name]).only == name
    with pytest.raises(SystemExit):
        run.parse_args(["--only", "nonsense"])


def test_only_report_rewrites_page_and_readme(tmp_path, monkeypatch) -> None:
    out = tmp_path / "outputs"
    out.mkdir()
    (out / "results.json").write_text(json.dumps(DATA))
    (tmp_path / "README.md").write_text("intro\n<!-- results-table -->\nold\n<!-- /results-table -->\nend\n")
    monkeypatch.setattr(run, "OUT", out)
    monkeypatch.setattr(run, "ROOT", tmp_path)
    monkeypatch.setattr(run, "DOC", tmp_path / "results.md")
    run.main(["--only", "report"])
    assert "| minmax | – | – | 12.35 (-1.50 [-2.00, -1.00]) |" in (tmp_path / "results.md").read_text()
    readme = (tmp_path / "README.md").read_text()
    assert readme.startswith("intro\n<!-- results-table -->\nTop-1 %") and readme.endswith("<!-- /results-table -->\nend\n")
    assert "| vit_mnist (mnist, 1000 images) | 52.90 | 12.35 (-1.50 ± 0.50) | – |" in readme
    assert json.loads((out / "results.json").read_text()) == DATA  # nothing measured, nothing changed


def test_fidelity_side_by_side_table() -> None:
    """The recorded side-by-side comparison becomes its own table, one row per comparison, notes below."""
    from bench.fidelity import side_by_side

    assert side_by_side(None) == []
    lines = side_by_side({"protocol": "P", "notes": ["n1"], "rows": [
        {"method": "FQ-ViT", "comparison": "vitq vs code", "cosine": 0.98751, "agreement": 79.296875,
         "sqnr_db": 16.004, "vitq": "abc1234"}]})
    assert lines[0] == "### Fidelity to published code" and lines[2] == "P"
    assert "| FQ-ViT | vitq vs code | 0.9875 | 79.30 | 16.00 | abc1234 |" in lines
    assert "- n1" in lines


def test_refreshing_one_section_keeps_the_other_sections_text() -> None:
    """Without stored data for them, the other sections keep their block of the old page, in place."""
    old = ("# Benchmark results\n\nold header\n\n## vit_mnist on mnist\n\nold mnist table\n\n"
           "## Fidelity on DeiT-S beside the published code\n\nold fidelity rows\n\n## DeiT-S speed and memory\n\nold speed\n")
    data = {"fidelity": [{"label": "vitq minmax W4A4", "setting": "W4/A4 matmul", "agreement": 30.0, "cosine": 0.8,
                          "sqnr_db": 4.5, "calib_seconds": 1.0}], "measured": {"fidelity": "abc1234 (2026-12-07)"}}
    page = run.write_report(data, ["--only", "fidelity"], old)
    assert "old mnist table" in page and "old speed" in page and "old fidelity rows" not in page
    assert "| vitq minmax W4A4 (W4/A4 matmul) | 30.00 | 0.8000 | 4.50 | 1.0 |" in page
    assert page.index("## vit_mnist") < page.index("## Fidelity") < page.index("## DeiT-S speed")
    assert "`fidelity` at abc1234 (2026-12-07)" in page and "old header" not in page


def test_a_section_sharing_data_does_not_replace_an_unmeasured_sections_text(tmp_path, monkeypatch) -> None:
    """The FQ-ViT ablation adds rows to the accuracy data: with only `fqvit` measured, the accuracy tables
    and the README summary keep their old text."""
    old = "# Benchmark results\n\n## vit_mnist on mnist\n\nold mnist table\n"
    data = {**DATA, "measured": {"fqvit": "abc1234 (2026-12-07)"}}
    page = run.write_report(data, ["--only", "fqvit"], old)
    assert "old mnist table" in page
    assert run.readme_summary(data) is None
    assert run.readme_summary({**data, "measured": {n: "x" for n in ("accuracy", "search", "finetune")}})


def test_recon_rows_refreshes_only_the_named_rows_in_place(monkeypatch) -> None:
    """`--only reconstruct --recon-rows qdrop` measures the qdrop rows again, keeps every other row where it
    was, and the page says which rows were measured when."""
    from bench import reconstruct

    labels = list(reconstruct.recon_recipes())
    old = [{**_row(label, 40.0, -12.0, [-13.0, -11.0]), "reconstruct_units": []} for label in labels]
    asked = []

    def fake_rows(model, recipes, on_row=None):  # noqa: ANN001
        asked.extend(recipes)
        return [{**_row(label, 50.0, -2.9, [-3.5, -2.3]), "reconstruct_units": []} for label in recipes]

    monkeypatch.setattr(reconstruct, "accuracy_rows", fake_rows)
    data = {"reconstruct": old, "measured": {"reconstruct": "ad04551 (2026-12-07)"}}
    reconstruct.measure(data, run.parse_args(["--only", "reconstruct", "--recon-rows", "qdrop"]), lambda: None)
    assert asked == [label for label in labels if "qdrop" in label] and len(asked) == 3
    assert [r["label"] for r in data["reconstruct"]] == labels
    assert {r["label"] for r in data["reconstruct"] if r["quant_top1"] == 50.0} == set(asked)
    data["measured"]["reconstruct"] = "a12fa92 (2026-12-07)"
    text = "\n".join(reconstruct.report(data))
    assert "recon-qdrop-w3a3, recon-qdrop-w4a4, recon-qdrop-w6a6 measured again" in text
    assert "at a12fa92 (2026-12-07), the others in one invocation at ad04551 (2026-12-07)" in text
    with pytest.raises(SystemExit, match="no reconstruct row"):
        reconstruct.measure({"reconstruct": old}, run.parse_args(["--only", "reconstruct", "--recon-rows", "brecq"]),
                            lambda: None)


def test_search_rows_refreshes_only_the_named_rows_and_recomputes_every_interval(monkeypatch) -> None:
    """`--only search --search-rows noisy` measures the NoisyQuant rows again, keeps the others in place, pairs
    every comparison again (the intervals read the run directories) and says which rows were measured when."""
    from bench import search

    labels = list(search.search_recipes())
    old = [{**_row(label, 40.0, -12.0, [-13.0, -11.0]), "calib_seconds": 1.0} for label in labels]
    asked, paired = [], []

    def fake_rows(model, recipes, on_row=None):  # noqa: ANN001
        asked.extend(recipes)
        return [{**_row(label, 50.0, -2.9, [-3.5, -2.3]), "calib_seconds": 9.0} for label in recipes]

    monkeypatch.setattr(search, "accuracy_rows", fake_rows)
    monkeypatch.setattr(search, "paired_deltas", lambda key, rows: paired.append([r["label"] for r in rows]) or [])
    data = {"search": {"cifar": {"rows": old, "argv": "--only search --models cifar", "load": "1"}},
            "measured": {"search": "ad04551 (2026-12-07)"}}
    search.measure(data, run.parse_args(["--only", "search", "--models", "cifar", "--search-rows", "noisy"]),
                   lambda: None)
    assert asked == [label for label in labels if "noisy" in label] and len(asked) == 12
    assert [r["label"] for r in data["search"]["cifar"]["rows"]] == labels == paired[0]
    assert {r["label"] for r in data["search"]["cifar"]["rows"] if r["quant_top1"] == 50.0} == set(asked)
    data["measured"]["search"] = "b000000 (2026-12-08)"
    text = "\n".join(search.report(data))
    assert "noisyquant-w8a8, omse+noisy-w4a4" in text and "linear-sym-w4a4," not in text
    assert ("measured again by `python -m bench.run --only search --models cifar --search-rows ...` at b000000 "
            "(2026-12-08), the others in one invocation at ad04551 (2026-12-07)") in text
    with pytest.raises(SystemExit, match="no search row"):
        search.measure({"search": {}}, run.parse_args(["--only", "search", "--models", "cifar", "--search-rows",
                                                       "noisy"]), lambda: None)
    search.measure(data, run.parse_args(["--only", "search", "--models", "cifar"]), lambda: None)
    assert "search_refreshed" not in data and len(asked) == 12 + len(labels)
