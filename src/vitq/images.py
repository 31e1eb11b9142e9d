"""Image files checked before a run depends on them, and errors that name the file.

A truncated JPEG decodes without complaint until the batch that holds it, hours into an evaluation; a
cheap structural check (the header parses, a JPEG ends with its end-of-image marker, other formats pass
PIL's verify) over the files a run will read finds it at start-up instead.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

from PIL import Image

log = logging.getLogger(__name__)

SKIP_OPTION = "task.skip_bad_images=true"


class BadImageError(OSError):
    """An image file that cannot be decoded; the message names it and the fix."""


def image_problem(path: str | Path) -> str | None:
    """Why `path` cannot be used as an image, or None if it looks whole."""
    try:
        with open(path, "rb") as f:
            with Image.open(f) as img:
                fmt = img.format
                if fmt != "JPEG":
                    img.verify()  # PNG and friends: chunk structure and checksums
            if fmt == "JPEG":
                f.seek(0, 2)
                f.seek(max(0, f.tell() - 64))
                if b"\xff\xd9" not in f.read():
                    return "truncated (no JPEG end-of-image marker)"
    except Exception as e:  # noqa: BLE001  (any reason a file cannot be read is reported with its name)
        return f"{type(e).__name__}: {e}"
    return None


def check_images(paths: Iterable[str], what: str, skip: bool) -> set[str]:
    """Check every file; raise naming the bad ones, or (skip) warn naming them and return them."""
    paths = list(dict.fromkeys(paths))
    with ThreadPoolExecutor(max_workers=8) as pool:
        problems = [(p, why) for p, why in zip(paths, pool.map(image_problem, paths, chunksize=256)) if why]
    if not problems:
        return set()
    listing = "\n  ".join(f"{p}: {why}" for p, why in problems[:10])
    more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
    if not skip:
        raise BadImageError(f"{len(problems)} unreadable image(s) in {what}:\n  {listing}{more}\nReplace or delete "
                            f"them, or pass {SKIP_OPTION} to leave them out with a warning")
    log.warning("leaving out %d unreadable image(s) of %s (%s):\n  %s%s", len(problems), what, SKIP_OPTION,
                listing, more)
    return {p for p, _ in problems}


def load_rgb(path: str) -> Image.Image:
    """ImageFolder's loader, naming the file when decoding fails (the start-up check cannot see every
    kind of damage)."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except Exception as e:  # noqa: BLE001
        raise BadImageError(f"cannot decode image {path} ({type(e).__name__}: {e}); replace or delete it, or pass "
                            f"{SKIP_OPTION}") from e
