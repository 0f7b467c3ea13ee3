"""Which dispatch table applies to a GPU: device keys from properties, shipped tables, the per-device cache.

The fused-kernel/two-GEMM/dense crossovers of ``lowrank_matmul`` are set by launch latency against
bytes over bandwidth, so a table measured on one GPU says little about another. Tables are
therefore keyed by what decides them, read from the device's properties and never from its
marketing name:

* compute capability (the instruction set and the occupancy limits every kernel config assumes),
* SM count (how many programs the persistent kernel runs; the grid the barrier spans),
* memory-size class (total memory in GiB rounded to a multiple of 4: the HBM generation and stack
  count, hence the bandwidth, follow from it within one chip: H100 SXM 80 GiB HBM3 at 3.35 TB/s,
  H200 140 GiB HBM3e at 4.8 TB/s),
* L2 size in MiB (what a layer's weights must exceed to be streamed from HBM).

``device_key`` spells these as e.g. ``cc90_sm132_mem80g_l2_50m`` (the H100 SXM). Bandwidth is not in
the key: torch exposes no bandwidth on every version (CUDA 13 dropped the memory clock from its
properties), and a key must read the same everywhere the device is the same.

How a table is treated (``match``):

* ``"exact"``: all four properties agree. Its choices (backend and kernel config per layer shape
  and T bucket) and its dense-vs-factorized timings are used as measured.
* ``"sibling"``: same capability and SM count (the same chip), other memory class or L2. Its
  backend choices are NOT used: the crossover between the fused kernel's fixed latency and cuBLAS'
  bandwidth moves with memory bandwidth (the H100-tuned fused kernel loses to torch's two GEMMs on
  an H200 at some LLaMA-7B shapes, issue #17). Only its dense-fallback verdicts are used, and only
  where dense won by a clear margin (``SIBLING_DENSE_MARGIN``): on the same chip the launch
  latency that makes small factorized layers lose is the same, and more bandwidth shrinks the byte
  term that is dense's only disadvantage, so "dense clearly faster" carries over while "factorized
  faster" need not.
* ``None``: another chip. Nothing is used.

Without an exact table (no shipped one and no ``compress tune`` run on this device) the dispatch
runs cuBLAS' two GEMMs, which is torch's two-GEMM path itself: never slower than it.

Per-device cache: ``python -m compress tune`` writes ``<cache dir>/<device key>.json`` (same format
as the shipped tables); the cache dir is ``$LOWRANK_TUNING_DIR``, else
``$XDG_CACHE_HOME/lowrank-kit/tuning``, else ``~/.cache/lowrank-kit/tuning``. The dispatch overlays
its entries on the shipped exact table (a cached shape and T bucket wins). ``LOWRANK_TUNING_DIR=off``
disables the cache (reads and writes).

Importing this module never initialises CUDA.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "CONFIG_DIR",
    "CONFIG_PATH",
    "SIBLING_DENSE_MARGIN",
    "cache_dir",
    "cache_path",
    "device_key",
    "device_properties",
    "dispatch_table",
    "load_cache",
    "match",
    "merge_tables",
    "read_table",
    "save_cache",
    "shipped_tables",
]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# The H100 SXM table (capability 9.0, 132 SMs, 80 GiB, 50 MiB L2); its latency model is the default of
# ``dispatch.predicted_ms``.  Every shipped table is CONFIG_DIR/lowrank_matmul.<device key>.json.
CONFIG_PATH = CONFIG_DIR / "lowrank_matmul.cc90_sm132_mem80g_l2_50m.json"
TABLE_GLOB = "lowrank_matmul.*.json"
# A sibling table's dense verdict counts only where dense took at most this share of the factorized time.
SIBLING_DENSE_MARGIN = 0.8
_KEY_FIELDS = ("capability", "sm_count", "mem_class_gib", "l2_mib")


def device_properties(props: Any) -> dict[str, Any]:
    """The keyed properties of ``torch.cuda.get_device_properties(i)`` (or any object with its fields).

    ``name`` and ``mem_gib`` are recorded for people and never compared.
    """
    total = int(getattr(props, "total_memory", 0) or 0)
    l2 = int(getattr(props, "L2_cache_size", 0) or 0)
    gib = total / 2**30
    return {
        "capability": f"{int(props.major)}.{int(props.minor)}",
        "sm_count": int(props.multi_processor_count),
        "mem_class_gib": int(4 * round(gib / 4)),
        "l2_mib": int(round(l2 / 2**20)),
        "mem_gib": round(gib, 1),
        "name": str(getattr(props, "name", "")),
    }


def device_key(dev: dict[str, Any]) -> str:
    """File-name-safe key of keyed properties, e.g. ``cc90_sm132_mem80g_l2_50m``."""
    cc = str(dev["capability"]).replace(".", "")
    return f"cc{cc}_sm{int(dev['sm_count'])}_mem{int(dev['mem_class_gib'])}g_l2_{int(dev['l2_mib'])}m"


def match(table_dev: dict[str, Any] | None, dev: dict[str, Any]) -> str | None:
    """``"exact"``, ``"sibling"`` (same capability and SM count) or None; see the module docstring."""
    if not table_dev or any(table_dev.get(k) is None for k in _KEY_FIELDS):
        return None
    if str(table_dev["capability"]) != str(dev["capability"]) or int(table_dev["sm_count"]) != int(dev["sm_count"]):
        return None
    same = all(int(table_dev[k]) == int(dev[k]) for k in ("mem_class_gib", "l2_mib"))
    return "exact" if same else "sibling"


# ---------------------------------------------------------------------------- files
def cache_dir() -> Path | None:
    """Directory of the per-device tuning cache, or None when ``LOWRANK_TUNING_DIR=off``."""
    env = os.environ.get("LOWRANK_TUNING_DIR")
    if env is not None and env.strip().lower() in ("off", "0", "none", ""):
        return None
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lowrank-kit" / "tuning"


def cache_path(key: str) -> Path | None:
    root = cache_dir()
    return None if root is None else root / f"{key}.json"


def read_table(path: Path) -> dict | None:
    """A table file as stored, or None if it is unreadable or not a JSON object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_cache(dev: dict[str, Any]) -> dict | None:
    """This device's cached tuning table, if one exists and was measured on an exactly matching device."""
    path = cache_path(device_key(dev))
    if path is None or not path.is_file():
        return None
    table = read_table(path)
    if table is None or match(table.get("device"), dev) != "exact":
        return None
    return table


def merge_tables(base: dict | None, over: dict | None) -> dict:
    """``base`` overlaid by ``over``: per layer shape (or sibling group) and T bucket, ``over`` wins; its latency
    model too."""
    out = copy.deepcopy(base) if base else {}
    if not over:
        return out
    for section in ("entries", "groups"):  # layer shapes; fused sibling groups (dispatch.group_kernel)
        merged = out.setdefault(section, {})
        for key, per_t in over.get(section, {}).items():
            merged.setdefault(key, {}).update(copy.deepcopy(per_t))
    for field in ("latency_model", "device", "env", "ceilings"):
        if over.get(field):
            out[field] = copy.deepcopy(over[field])
    out["sources"] = list(base.get("sources", []) if base else []) + list(over.get("sources", []))
    return out


def save_cache(dev: dict[str, Any], table: dict, *, replace: bool = False) -> Path:
    """Write ``table`` as this device's cache (merged into what is there unless ``replace``); atomic."""
    path = cache_path(device_key(dev))
    if path is None:
        raise OSError("the tuning cache is disabled (LOWRANK_TUNING_DIR=off)")
    body = dict(table)
    body["device"] = dict(dev)
    body["device_key"] = device_key(dev)
    if not replace:
        old = load_cache(dev)
        if old is not None:
            body = merge_tables(old, body)
            body["device"], body["device_key"] = dict(dev), device_key(dev)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(body, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def shipped_tables(config_dir: Path | None = None) -> list[tuple[Path, dict]]:
    """(path, table) of every shipped ``lowrank_matmul.<device key>.json``, sorted by name."""
    root = config_dir or CONFIG_DIR
    out = []
    for path in sorted(root.glob(TABLE_GLOB)):
        table = read_table(path)
        if table is not None and isinstance(table.get("device"), dict):
            out.append((path, table))
    return out


def dispatch_table(dev: dict[str, Any], config_dir: Path | None = None) -> tuple[dict, str | None]:
    """(table, trust) for a device: trust is ``"exact"``, ``"sibling"`` or None (empty table).

    Exact: the shipped table of this device key (if any) overlaid by this device's cache (if any).
    Else the first shipped sibling table, else nothing.
    """
    exact, sibling = None, None
    for path, table in shipped_tables(config_dir):
        how = match(table["device"], dev)
        if how == "exact" and exact is None:
            exact = dict(table, sources=[str(path)])
        elif how == "sibling" and sibling is None:
            sibling = dict(table, sources=[str(path)])
    cached = load_cache(dev)
    if cached is not None:
        cached = dict(cached, sources=[str(cache_path(device_key(dev)))])
    if exact is not None or cached is not None:
        return merge_tables(exact, cached), "exact"
    if sibling is not None:
        return sibling, "sibling"
    return {}, None
