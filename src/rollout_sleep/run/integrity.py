"""Whether a saved file is whole and unchanged: its checksum (recorded when a checkpoint is saved, compared when
it is resumed), its format's own checks (a ``.safetensors`` file's length against its header, torch's zip
directory), and a deep read for a file that fails to load (torch's per-record CRCs, NaN/Inf in saved weights).

CRC-32 (``zlib.crc32``) is the checksum: it catches disk and copy errors (not tampering) at ~3 GiB/s a core,
files read in chunks, several files at once (docs/troubleshooting.md gives the measured cost).

>>> import tempfile
>>> p = Path(tempfile.mkdtemp()) / "f.bin"
>>> _ = p.write_bytes(b"rollout")
>>> checksum(p)
'crc32:74a0c58f'
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHUNK = 8 << 20  # bytes read at a time
_TORCH_ZIP = (".bin", ".pt", ".pth", ".pkl")  # what torch.save writes (accelerate's optimizer, RNG states, ...)


def checksum(path: Path) -> str:
    """``crc32:<8 hex digits>`` of the file at ``path``, read in chunks."""
    buf = memoryview(bytearray(CHUNK))
    crc = 0
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            crc = zlib.crc32(buf[:n], crc)
    return f"crc32:{crc:08x}"


def checksums(folder: Path, names: list[str]) -> dict[str, str]:
    """:func:`checksum` of each of ``names`` (relative to ``folder``), several files at once (zlib releases
    Python's lock while it sums, so threads use as many cores as there are files)."""
    workers = max(1, min(8, len(names), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip(names, pool.map(lambda name: checksum(folder / name), names)))


def safetensors_problem(path: Path) -> str | None:
    """Why the ``.safetensors`` file at ``path`` is not whole (shorter or longer than its header says, an
    unreadable header), or ``None``."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"{path.name} is truncated ({size} bytes)"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"{path.name} is truncated (header of {n} bytes, file of {size})"
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            return f"{path.name} has an unreadable header"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        return f"{path.name} is truncated ({size} bytes, its header describes {8 + n + end})"
    return None


def _head(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(4)


def _is_zip(path: Path) -> bool:
    return _head(path)[:2] == b"PK"


def zip_problem(path: Path) -> str | None:
    """Why torch's zip file at ``path`` is not whole (its directory is missing, or it is no zip archive at all:
    ``torch.save`` writes one, so other bytes were written over it, e.g. zeros), or ``None``."""
    head = _head(path)
    if head[:2] != b"PK":
        size = path.stat().st_size
        if size == 0:
            return f"{path.name} is empty (0 bytes; torch.save writes a zip archive)"
        return (f"{path.name} is not a zip archive ({size} bytes starting {head!r}; torch.save "
                "writes one): it was overwritten or damaged after the save")
    if not zipfile.is_zipfile(path):
        return f"{path.name} is truncated (its zip directory is missing)"
    return None


def format_problem(path: Path) -> str | None:
    """The cheap check of a saved file by its kind (:func:`safetensors_problem`, :func:`zip_problem` for what
    ``torch.save`` writes: :data:`_TORCH_ZIP`); ``None`` for other kinds (nothing cheap to check)."""
    if path.suffix == ".safetensors":
        return safetensors_problem(path)
    return zip_problem(path) if path.suffix in _TORCH_ZIP else None


def damage(path: Path) -> str | None:
    """What a full read of the saved file at ``path`` finds damaged, or ``None``: a torch zip record whose bytes
    fail its CRC, a ``.safetensors`` tensor holding NaN or Inf (the recipe never saves non-finite weights: the
    non-finite guard stops the step first). Reads the whole file: for a checkpoint that failed to load."""
    problem = format_problem(path)
    if problem:
        return problem
    if path.suffix == ".safetensors":
        import torch
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as fh:
                for name in fh.keys():
                    t = fh.get_tensor(name)
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        return f"{path.name} holds NaN or Inf in {name!r} (its bytes were damaged after the save)"
        except Exception as err:  # safetensors' own error type
            return f"{path.name} cannot be read ({type(err).__name__}: {err})"
    elif _is_zip(path):
        try:
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
        except Exception as err:  # zipfile.BadZipFile, an OSError, a header cut short (struct.error), ...
            return f"{path.name} cannot be read ({type(err).__name__}: {err})"
        if bad is not None:
            return f"{path.name} is damaged (its record {bad} fails its CRC check)"
    return None
