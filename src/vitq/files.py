"""Files written whole or not at all."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def written_atomically(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`, private to this process, and move it into place only when
    the block finishes: readers never see half a file, and two processes writing the same cache entry
    never share a temporary file.

    The target must be a regular file or not exist yet: renaming onto a device (`/dev/null`), a pipe or a
    directory would replace it, so such a target is refused before anything is written."""
    path = Path(path)
    if path.exists() and not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file (a device, pipe or socket)"
        raise ValueError(f"cannot write {path}: it is {kind}, and writing whole files replaces their target; "
                         "give the path of a regular file")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
