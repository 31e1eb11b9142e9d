"""The sensitivity report's files and lines, from a report written by hand: the CSV and its top-k reader,
the plot, the printed table, and override arguments that Hydra's own parser reads back."""
from __future__ import annotations

import csv
import math
import shlex
from fnmatch import fnmatchcase

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from vitq import SensitivityReport
from vitq.report.sensitivity import (glob_escape, hydra_override, keep_overrides, plot_sensitivity, read_top,
                                     top_lines, write_csv)


def _row(name, kind, unit, bits, only, but, gain, rank, metric=None):
    return {"name": name, "kind": kind, "unit": unit, "bits": bits, "only_sqnr": only, "all_but_sqnr": but,
            "gain_db": gain, "only_metric": metric, "all_but_metric": metric, "rank": rank}


@pytest.fixture
def report():
    """Four points in model order; all quantized: 12.5 dB; ranks by gain: fc1.input (inf), qkv.input (5.0),
    head.weight (0.25), patch_embed (-0.5)."""
    points = [_row("patch_embed.proj.weight", "weight", "patch_embed", 8, 40.0, 12.0, -0.5, 4, 0.75),
              _row("blocks.0.attn.qkv.input", "linear_input", "blocks.0", 4, 20.0, 17.5, 5.0, 2, 0.5),
              _row("blocks.0.mlp.fc1.input", "linear_input", "blocks.0", 2, 13.0, math.inf, math.inf, 1, 0.25),
              _row("head.weight", "weight", "head", 8, 35.0, 12.75, 0.25, 3, 1.0)]
    return SensitivityReport(points=points, units=[], totals={"all": {"sqnr": 12.5, "metric": 0.5},
                                                              "float": {"sqnr": math.inf, "metric": 1.0}})


def test_the_csv_holds_one_row_per_point_best_first_and_read_top_reads_it_back(report, tmp_path):
    path = write_csv(report, tmp_path / "sensitivity.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sensitivity.csv"]  # no partial file left
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["blocks.0.mlp.fc1.input", "blocks.0.attn.qkv.input", "head.weight",
                                         "patch_embed.proj.weight"]
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    assert rows[0]["gain_db"] == "inf" and rows[1]["gain_db"] == "5.0000" and rows[3]["gain_db"] == "-0.5000"
    assert rows[1]["only_sqnr"] == "20.0000" and rows[1]["bits"] == "4" and rows[1]["unit"] == "blocks.0"
    assert rows[2]["only_metric"] == "1.000000" and rows[0]["all_but_metric"] == "0.250000"
    assert read_top(path, 2) == ["blocks.0.mlp.fc1.input", "blocks.0.attn.qkv.input"]
    assert read_top(path, 10) == [r["name"] for r in rows]
    assert read_top(path, 0) == []


def test_read_top_sorts_by_rank_not_by_line_order(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("name,rank,gain_db\nb,2,1.0\nc,10,0.1\na,1,3.0\n")
    assert read_top(path, 3) == ["a", "b", "c"]  # 10 after 2: ranks are numbers, not strings


def test_read_top_names_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="no sensitivity CSV at .*missing.csv"):
        read_top(tmp_path / "missing.csv", 3)
    other = tmp_path / "other.csv"
    other.write_text("name,gain_db\na,1.0\n")
    with pytest.raises(ValueError, match="no rank column"):
        read_top(other, 3)
    bad = tmp_path / "bad.csv"
    bad.write_text("name,rank\na,1\nb,first\n")
    with pytest.raises(ValueError, match="line 3: rank 'first'"):
        read_top(bad, 3)


def test_the_plot_is_a_png_written_whole(report, tmp_path):
    path = plot_sensitivity(report, tmp_path / "sensitivity.png", "tiny ViT, W8A8")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sensitivity.png"]


def test_the_printed_table_lists_the_top_points_best_first(report):
    lines = top_lines(report, k=2)
    assert lines[0] == "all points quantized: SQNR 12.50 dB, metric 50.00 (float 100.00)"
    assert len(lines) == 4  # summary, column heads, two points
    assert lines[1].split() == ["rank", "point", "kind", "bits", "gain", "dB", "only", "dB", "all-but", "dB",
                                "only", "%", "all-but", "%"]
    assert lines[2].split() == ["1", "blocks.0.mlp.fc1.input", "linear_input", "2", "inf", "13.00", "inf",
                                "25.00", "25.00"]
    assert lines[3].split() == ["2", "blocks.0.attn.qkv.input", "linear_input", "4", "5.00", "20.00", "17.50",
                                "50.00", "50.00"]
    no_metric = SensitivityReport(points=[{**r, "only_metric": None, "all_but_metric": None} for r in report.points],
                                  totals={"all": {"sqnr": 12.5, "metric": None}})
    assert "%" not in top_lines(no_metric)[1] and len(top_lines(no_metric)) == 6


def test_overrides_keep_the_top_points_at_the_bits_asked(report):
    assert report.top(2) == ["blocks.0.mlp.fc1.input", "blocks.0.attn.qkv.input"]
    assert report.overrides(2) == [{"pattern": "blocks.0.mlp.fc1.input", "bits": 8},
                                   {"pattern": "blocks.0.attn.qkv.input", "bits": 8}]
    assert report.overrides(1, bits=None) == [{"pattern": "blocks.0.mlp.fc1.input", "enable": False}]
    with pytest.raises(ValueError, match="bits=1"):
        report.overrides(1, bits=1)


def _parsed(arg):
    override = OverridesParser.create().parse_overrides([arg])[0]
    assert override.key_or_group == "quant.overrides"
    return override.value()


def test_the_hydra_argument_parses_back_to_the_same_list(report):
    existing = [{"pattern": "head.*", "bits": 8, "kind": "weight"},
                {"pattern": "patch_embed.*", "enable": False, "optional": True},
                {"pattern": "blocks.*.attn.softmax.output", "observer": "percentile",
                 "observer_args": {"lo": 0.1, "hi": 99.9}}]
    arg = report.hydra_override(2, bits=6, existing=existing)
    assert _parsed(arg) == [*existing, {"pattern": "blocks.0.mlp.fc1.input", "bits": 6},
                            {"pattern": "blocks.0.attn.qkv.input", "bits": 6}]
    assert shlex.split(report.hydra_override(2, bits=6, existing=existing, shell=True)) == [arg]
    assert _parsed(report.hydra_override(0)) == []


@pytest.mark.parametrize("pattern", ['a"b', "ends\\", "x\\y", "two\\\\\"q", "with space, comma", "[ab]*?"])
def test_awkward_strings_survive_hydra_quoting(pattern):
    assert _parsed(hydra_override([{"pattern": pattern, "bits": 8}])) == [{"pattern": pattern, "bits": 8}]


def test_a_point_name_becomes_a_pattern_matching_only_itself():
    name = "odd[0].point*"
    assert fnmatchcase(name, glob_escape(name))
    assert not fnmatchcase("odd0.point*", glob_escape(name)) and not fnmatchcase("odd[0].pointX", glob_escape(name))
    assert keep_overrides(["blocks.0.attn.qkv.input"]) == [{"pattern": "blocks.0.attn.qkv.input", "bits": 8}]


def test_read_top_can_skip_points_already_wide_enough(tmp_path):
    table = tmp_path / "sensitivity.csv"
    table.write_text("rank,name,bits\n2,b,4\n1,a,8\n3,c,4\n")
    assert read_top(table, 2) == ["a", "b"]
    assert read_top(table, 2, narrower_than=8) == ["b", "c"]  # a is at 8 bits already
