"""Checkpoints of compressed models that plain `AutoModelForCausalLM.from_pretrained` loads.

Format: an ordinary Hugging Face directory (config.json + safetensors + tokenizer files). The
config carries a ``quantization_config`` with ``quant_method: "lowrank"`` holding

- ``ranks``:  {module name: rank} for layers stored as `LowRankLinear` (tensors ``U``, ``V``);
- ``widths``: {module name: [out_features, in_features]} for linears whose shape was pruned;
- ``dense_shapes``: {module name: [out, in]} of every targeted linear before compression, so
  size accounting works on a reloaded model.

Importing `lowrank` registers a config class and an `HfQuantizer` under that name with
transformers, whose only job is to rebuild those module shapes on the meta device before the
weights stream in. No custom code is executed from the checkpoint and nothing is pickled.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank.faults import fault_point
from lowrank.linear import LowRankLinear
from lowrank.surgery import get_module, recorded_dense_shapes, replace_module_, set_dense_shapes, target_linears

__all__ = [
    "CheckpointError",
    "LowRankConfig",
    "compression_layout",
    "load_pretrained",
    "save_pretrained",
    "verify_safetensors",
]

QUANT_METHOD = "lowrank"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint directory is missing, truncated or inconsistent."""


# ---------------------------------------------------------------------------- layout
def compression_layout(model: nn.Module, dense_shapes: dict[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    """The per-layer ranks and widths that describe how `model` differs from its dense architecture."""
    ranks: dict[str, int] = {}
    widths: dict[str, list[int]] = {}
    shapes = dict(dense_shapes or recorded_dense_shapes(model) or {})
    for name, module in target_linears(model).items():
        if isinstance(module, LowRankLinear):
            ranks[name] = module.rank
        original = shapes.get(name)
        current = (module.out_features, module.in_features)
        if original is None:
            shapes[name] = current
        elif tuple(original) != current:
            widths[name] = list(current)
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "ranks": ranks,
        "widths": widths,
        "dense_shapes": {k: list(v) for k, v in shapes.items()},
    }


def apply_layout_(model: nn.Module, layout: dict[str, Any]) -> None:
    """Rebuild module shapes from a layout (used on the meta-device skeleton before loading)."""
    widths = layout.get("widths", {})
    ranks = layout.get("ranks", {})
    for name in sorted(set(widths) | set(ranks)):
        old = get_module(model, name)
        if not isinstance(old, (nn.Linear, LowRankLinear)):
            raise CheckpointError(f"checkpoint layout names {name!r}, which is not a linear layer in this model")
        out_f, in_f = widths.get(name, (old.out_features, old.in_features))
        has_bias = old.bias is not None
        dtype = old.U.dtype if isinstance(old, LowRankLinear) else old.weight.dtype
        device = old.U.device if isinstance(old, LowRankLinear) else old.weight.device
        if name in ranks:
            new: nn.Module = LowRankLinear(in_f, out_f, int(ranks[name]), bias=has_bias, device=device, dtype=dtype)
        else:
            new = nn.Linear(in_f, out_f, bias=has_bias, device=device, dtype=dtype)
        replace_module_(model, name, new)
    set_dense_shapes(model, layout.get("dense_shapes", {}))


# ---------------------------------------------------------------------------- transformers registration
def _register_with_transformers() -> type | None:
    try:
        from transformers.quantizers import HfQuantizer
        from transformers.quantizers.auto import (
            AUTO_QUANTIZATION_CONFIG_MAPPING,
            register_quantization_config,
            register_quantizer,
        )
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except ImportError:  # transformers too old or absent: load_pretrained still works
        return None

    if QUANT_METHOD in AUTO_QUANTIZATION_CONFIG_MAPPING:
        return AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD]

    @register_quantization_config(QUANT_METHOD)
    class LowRankConfig(QuantizationConfigMixin):
        """Describes which linears are factorized (ranks) or narrowed (widths)."""

        def __init__(
            self,
            ranks: dict[str, int] | None = None,
            widths: dict[str, list[int]] | None = None,
            dense_shapes: dict[str, list[int]] | None = None,
            format_version: int = FORMAT_VERSION,
            **kwargs: Any,
        ) -> None:
            self.quant_method = QUANT_METHOD
            self.ranks = dict(ranks or {})
            self.widths = dict(widths or {})
            self.dense_shapes = dict(dense_shapes or {})
            self.format_version = format_version
            if format_version > FORMAT_VERSION:
                raise CheckpointError(
                    f"checkpoint format version {format_version} is newer than this toolkit supports ({FORMAT_VERSION})"
                )
            # Keep unknown keys (method metadata) so a load -> save round trip preserves them.
            for key, value in kwargs.items():
                setattr(self, key, value)

        def to_dict(self) -> dict[str, Any]:
            out = dict(self.__dict__)
            out["quant_method"] = QUANT_METHOD
            return out

    @register_quantizer(QUANT_METHOD)
    class LowRankQuantizer(HfQuantizer):
        """Restores factorized / narrowed module shapes; weights then load as ordinary tensors."""

        requires_calibration = False

        def __init__(self, quantization_config: Any, **kwargs: Any) -> None:
            super().__init__(quantization_config, **kwargs)

        def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
            apply_layout_(model, self.quantization_config.to_dict())
            return model

        def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
            return model

        def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return True

        @property
        def is_compileable(self) -> bool:
            return True

    return LowRankConfig


LowRankConfig = _register_with_transformers()


# ---------------------------------------------------------------------------- integrity
def verify_safetensors(path: str | os.PathLike) -> None:
    """Check that a safetensors file is complete: header parses and every tensor's bytes are present.

    Raises `CheckpointError` naming the file, instead of the loader's opaque error much later.
    """
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len <= 0 or 8 + header_len > size:
                raise CheckpointError(f"{path}: truncated or corrupted safetensors header")
            header = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupted safetensors header ({exc})") from exc
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise CheckpointError(
            f"{path}: truncated or corrupted safetensors file "
            f"(expected {8 + header_len + end} bytes, found {size})"
        )


def _verify_directory(path: Path) -> None:
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json; not a model directory")
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{path}: no *.safetensors weights")
    for shard in shards:
        verify_safetensors(shard)


# ---------------------------------------------------------------------------- save / load
def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _umask() -> int:
    """The process's umask, read without changing it where /proc allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask_permissions(root: str | os.PathLike) -> None:
    """Give `root` (a file, or a directory and everything in it) the modes `os.makedirs` / `open`
    would: 0o777 (dirs) or 0o666 (files) less the umask. `tempfile.mkdtemp` makes 0o700 and
    safetensors writes 0o600 files, which a serving process running as another user cannot read."""
    mask = _umask()
    root = Path(root)
    for p in [root, *(root.rglob("*") if root.is_dir() else ())]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE).

    False where the platform, C library or file system cannot; an error of the swap itself raises.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl...
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Clean up after saves to `out_dir` that were killed: their temporary directories go, and a
    previous checkpoint moved aside by a save killed between its two renames goes back.

    The names carry the writing process's id; only those of processes that no longer exist count.
    """
    for p in sorted(out_dir.parent.glob(f".{out_dir.name}.*-*-*")):
        kind, _, rest = p.name[len(out_dir.name) + 2:].partition("-")
        pid = rest.partition("-")[0]
        if kind not in ("tmp", "old") or not pid.isdigit() or not p.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive
        except ProcessLookupError:
            pass
        except OSError:  # alive, but not ours to signal
            continue
        if kind == "old" and not out_dir.exists():
            os.replace(p, out_dir)
        else:
            shutil.rmtree(p, ignore_errors=True)


def save_pretrained(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    *,
    extra_metadata: dict[str, Any] | None = None,
    extra_files: dict[str, str] | None = None,
    max_shard_size: str = "5GB",
) -> Path:
    """Write `model` (compressed or dense) as a Hugging Face directory, atomically.

    Everything is written into a temporary directory beside `out_dir`, flushed, verified and
    then renamed into place, so a crash never leaves a directory that loads as a valid model.
    An existing `out_dir` is replaced only once the new one is complete, in one atomic exchange
    where the file system has it (Linux), so a kill at any moment leaves the old or the new one.
    `extra_files` ({name: text}, e.g. a report) are written into the directory before it is moved
    into place. Directory and files get the modes the umask gives (not `mkdtemp`'s 0o700).
    """
    out_dir = Path(out_dir).absolute()
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create output directory {parent}: {exc.strerror}") from exc
    if not os.access(parent, os.W_OK):
        raise CheckpointError(f"output directory {parent} is not writable")
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"output path {out_dir} exists and is not a directory")

    layout = compression_layout(model)
    if extra_metadata:
        layout["metadata"] = extra_metadata
    _remove_stale_temporaries(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=parent))
    config = model.config
    previous = getattr(config, "quantization_config", None)
    had_previous = hasattr(config, "quantization_config")
    try:
        compressed = bool(layout["ranks"] or layout["widths"])
        if compressed:
            config.quantization_config = layout
        elif had_previous:
            del config.quantization_config
        # The in-memory model may carry an hf_quantizer from a previous load; saving goes
        # through the same path either way.
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        fault_point("save:written")
        _verify_directory(tmp)
        apply_umask_permissions(tmp)
        _fsync_tree(tmp)
        fault_point("save:swap")
        if out_dir.exists() and _exchange(tmp, out_dir):
            shutil.rmtree(tmp, ignore_errors=True)  # now the previous checkpoint
        elif out_dir.exists():  # no atomic exchange here: two renames (a kill between them is undone next time)
            backup = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-{os.getpid()}-", dir=parent))
            backup.rmdir()
            os.replace(out_dir, backup)
            os.replace(tmp, out_dir)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if had_previous:
            config.quantization_config = previous
        elif hasattr(config, "quantization_config"):
            del config.quantization_config
    return out_dir


def load_pretrained(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    with_tokenizer: bool = False,
    **kwargs: Any,
) -> Any:
    """Load a checkpoint written by `save_pretrained` (or any HF causal LM directory).

    Verifies every shard first, so a truncated file is reported by name. Equivalent to
    `AutoModelForCausalLM.from_pretrained(path)` after `import lowrank`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    _verify_directory(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype if dtype is not None else "auto", **kwargs)
    if device is not None:
        model = model.to(device)
    model.eval()
    if with_tokenizer:
        return model, AutoTokenizer.from_pretrained(path)
    return model
