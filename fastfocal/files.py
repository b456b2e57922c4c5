"""Writing outputs: to a temporary name beside the output, then renamed into place, so a crash or
a full disk never leaves a truncated file where a complete one is expected."""
from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: Path, write) -> None:
    """write(binary file) to `.<name>.tmp<pid>` in path's folder (created if missing), then
    os.replace onto path; the temporary is removed whatever happens."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
