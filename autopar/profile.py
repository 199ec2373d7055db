"""The calibration profile on disk: where it lives, what it must hold, how it is read.

`autopar calibrate` (calibrate.py) measures this machine and writes the file;
`Mesh.local` reads it. Kept apart from the measuring so that the topology (mesh.py)
reads a profile without importing torch.distributed or the local launcher.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from autopar.errors import AutoparError

CALIBRATION_VERSION = 1
# The numbers `Mesh.local` needs; a file missing one of them is rejected.
CALIBRATION_KEYS = (
    "matmul_flops",
    "memory_bandwidth",
    "memory_bytes",
    "allreduce_bus_bw",
    "allreduce_latency",
)


def default_calibration_path() -> Path:
    """Where `autopar calibrate` writes and `Mesh.local` looks by default."""
    return Path.home() / ".cache" / "autopar" / "calibration.json"


def load_calibration(path: str | os.PathLike) -> dict:
    """Read a calibration file, checking it has every number `Mesh.local` needs."""
    path = Path(path)
    hint = f"rerun `autopar calibrate` or delete {path}"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise AutoparError(f"no calibration file at {path}; run `autopar calibrate`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AutoparError(f"cannot read calibration file {path}: {exc}; {hint}") from None
    if not isinstance(data, dict):
        raise AutoparError(f"calibration file {path} holds no JSON object; {hint}")
    bad = [k for k in CALIBRATION_KEYS if not _is_number(data, k) or data[k] < 0]
    if bad:
        raise AutoparError(f"calibration file {path} lacks valid values for {bad}; {hint}")
    return data


def physical_memory_bytes() -> int:
    """Installed RAM of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _is_number(data: dict, key: str) -> bool:
    value = data.get(key)
    return isinstance(value, int | float) and not isinstance(value, bool)
