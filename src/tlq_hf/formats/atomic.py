"""Atomic writes: a save that dies half-way leaves the previous file or checkpoint as it was.

:func:`atomic_file` is the one way tlq_hf writes a single file (a temporary sibling name, flushed to disk, then
renamed over the target).

:func:`atomic_folder` hands out a temporary sibling folder to write into; only when everything is written
does the new folder take the target's place: by an atomic exchange of the two names where the kernel offers
one (Linux ``renameat2(RENAME_EXCHANGE)``), else by two renames (a kill between them leaves the previous
checkpoint under ``.NAME.old-PID``, never a mix). Files in an existing target that the new save did not write
(a processor saved earlier, say) are carried over, so saving the model never drops them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..hostmem import libc_function

__all__ = ["atomic_file", "atomic_folder", "WEIGHT_FILES"]

#: What a model save owns: files of the previous checkpoint that match are never carried over (stale shards).
WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")
_RENAME_EXCHANGE = 2
logger = logging.getLogger(__name__)
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` atomically; ``False`` where the platform cannot."""
    renameat2 = libc_function("renameat2")
    if renameat2 is None:
        return False
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _carry_over(old: Path, new: Path) -> None:
    for path in old.iterdir():
        if (new / path.name).exists() or any(path.match(p) for p in WEIGHT_FILES):
            continue
        if path.is_dir():
            shutil.copytree(path, new / path.name)
        else:
            shutil.copy2(path, new / path.name)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recover(target: Path) -> None:
    """Clean up after saves that were killed: a previous checkpoint parked under ``.NAME.old-PID`` goes back
    to ``target`` if that is missing; temporary folders of dead processes are removed."""
    for sibling in target.parent.iterdir():
        kind, _, pid = sibling.name.removeprefix(f".{target.name}.").partition("-")
        if not sibling.name.startswith(f".{target.name}.") or kind not in ("tmp", "old") or not pid.isdigit():
            continue
        if _alive(int(pid)):
            continue
        if kind == "old" and not target.exists():
            logger.warning("tlq_hf: %s: restoring the checkpoint an interrupted save had set aside.", target)
            os.rename(sibling, target)
        else:
            shutil.rmtree(sibling, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, durable: bool = True) -> Iterator[str]:
    """Yield a temporary path next to ``target`` to write the file into; on normal exit it is flushed to disk
    (``durable``) and renamed over ``target`` in one step, on any exception it is removed and ``target`` is
    untouched. ``durable=False`` skips the flush, for scratch files a crashed run rebuilds anyway (a reader still
    never sees a half-written file)."""
    target = os.fspath(target)
    head, name = os.path.split(target)
    tmp = os.path.join(head, f".{name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``target``; on normal exit it becomes ``target`` atomically, on
    any exception (``KeyboardInterrupt`` included) it is removed and ``target`` is untouched."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    _recover(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if target.exists():
            if not target.is_dir():
                raise NotADirectoryError(f"{target} exists and is not a folder; remove it or save elsewhere.")
            _carry_over(target, tmp)
            if _exchange(tmp, target):  # tmp now holds the previous checkpoint
                shutil.rmtree(tmp, ignore_errors=True)
                return
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
