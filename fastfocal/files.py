"""Writing outputs: to a temporary name beside the output, then renamed into place, so a crash or
a full disk never leaves a truncated file where a complete one is expected."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write_all(outputs: list[tuple[Path, Callable]]) -> None:
    """Each write(binary file) to `.<name>.tmp<pid>` in its output's folder (created if missing),
    then all renamed into place, so related files (tokens and their sidecar) change together.
    An OSError names the output (not its temporary); the temporaries are removed whatever happens."""
    tmps: list[Path] = []
    path = None
    try:
        for path, write in outputs:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmps.append(path.with_name(f".{path.name}.tmp{os.getpid()}"))
            with open(tmps[-1], "wb") as f:
                write(f)
        for (path, _), tmp in zip(outputs, tmps):
            os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


def atomic_write(path: Path, write) -> None:
    """atomic_write_all of one output."""
    atomic_write_all([(path, write)])
