"""The image-file check: truncated and unreadable files are found and named before a run reads them."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitq.images import BadImageError, check_images, image_problem, load_rgb


def _jpeg(path: Path, seed: int = 0) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def _png(path: Path) -> Path:
    Image.fromarray(np.zeros((24, 24, 3), dtype=np.uint8)).save(path)
    return path


def test_whole_files_pass(tmp_path):
    assert image_problem(_jpeg(tmp_path / "a.jpg")) is None
    assert image_problem(_png(tmp_path / "a.png")) is None


def test_truncated_jpeg_and_png_and_text_are_found(tmp_path):
    jpg = _jpeg(tmp_path / "t.jpg")
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])
    assert image_problem(jpg) == "truncated (no JPEG end-of-image marker)"
    png = _png(tmp_path / "t.png")
    png.write_bytes(png.read_bytes()[:-20])
    assert image_problem(png) is not None
    txt = tmp_path / "notes.jpg"
    txt.write_text("not an image")
    assert "UnidentifiedImageError" in image_problem(txt)
    with pytest.raises(BadImageError, match=r"cannot decode image .*notes\.jpg .*task\.skip_bad_images=true"):
        load_rgb(str(txt))


def test_check_raises_naming_every_bad_file_or_skips_with_a_warning(tmp_path, caplog):
    good = [str(_jpeg(tmp_path / f"{i}.jpg", i)) for i in range(3)]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(Path(good[0]).read_bytes()[:100])
    with pytest.raises(BadImageError, match=r"1 unreadable image\(s\) in the test split:\n  .*bad\.jpg: OSError: Truncated File Read\nReplace or delete"):
        check_images([*good, str(bad)], "the test split", skip=False)
    with caplog.at_level(logging.WARNING):
        assert check_images([*good, str(bad)], "the test split", skip=True) == {str(bad)}
    assert "leaving out 1 unreadable image(s) of the test split" in caplog.text and "bad.jpg" in caplog.text
    assert check_images(good, "x", skip=False) == set()
