"""Our kernels live under the import name `lowrank_kernels`; `kernels` belongs to Hugging Face.

transformers (5.25+) depends on Hugging Face's hub-kernels library, whose import name is
`kernels`. The toolkit must work beside it from any working directory, and nothing of ours may
answer to `import kernels`. Each check runs in a fresh interpreter, since the working directory
decides what `sys.path[0]` finds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # import what is installed, as a user would
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _hub_kernels_installed() -> bool:
    try:
        from importlib.metadata import PackageNotFoundError, version

        version("kernels")
    except PackageNotFoundError:
        return False
    return True


@pytest.mark.parametrize("where", ["repo", "elsewhere"])
def test_import_kernels_is_never_ours(where, tmp_path):
    cwd = REPO if where == "repo" else tmp_path
    code = (
        "import importlib.util, json, sys\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "origin = None if spec is None else spec.origin\n"
        "locations = [] if spec is None else list(spec.submodule_search_locations or [])\n"
        "mods = [m for m in ('kernels.lowrank_matmul', 'kernels.gram', 'kernels._ext')\n"
        "        if spec is not None and importlib.util.find_spec(m) is not None]\n"
        "print(json.dumps({'origin': origin, 'locations': locations, 'ours': mods}))\n"
    )
    result = _python(code, cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    # No regular package of ours: no __init__.py of ours answers to `kernels`.
    assert found["origin"] is None or not Path(found["origin"]).resolve().is_relative_to(REPO), found
    if _hub_kernels_installed():
        # Their regular package wins over any bare folder on the path: none of our modules is reachable.
        assert found["ours"] == [], found
        assert found["origin"] and "site-packages" in found["origin"], found


@pytest.mark.skipif(not _hub_kernels_installed(), reason="Hugging Face's hub-kernels library is not installed")
@pytest.mark.parametrize("where", ["repo", "elsewhere"])
def test_hub_kernels_and_transformers_work_beside_us(where, tmp_path):
    cwd = REPO if where == "repo" else tmp_path
    code = (
        "import lowrank, lowrank_kernels.lowrank_matmul, transformers\n"
        "import kernels\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "assert is_kernels_available(), 'transformers must see hub-kernels'\n"
        "from kernels import CUDAProperties, kernelize  # names that only theirs has\n"
        "print(kernels.__file__)\n"
    )
    result = _python(code, cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "site-packages" in result.stdout or "dist-packages" in result.stdout


@pytest.mark.parametrize("where", ["repo", "elsewhere"])
def test_lowrank_linear_forward_from_any_directory(where, tmp_path):
    cwd = REPO if where == "repo" else tmp_path
    code = (
        "import torch\n"
        "from lowrank import LowRankLinear\n"
        "torch.manual_seed(int(torch.randint(0, 2**31, ()).item()))\n"
        "dense = torch.nn.Linear(48, 40)\n"
        "layer = LowRankLinear.from_linear(dense, rank=40)  # full rank: exact up to rounding\n"
        "x = torch.randn(3, 48)\n"
        "err = (layer(x) - dense(x)).abs().max().item()\n"
        "assert err < 1e-4, err\n"
        "import lowrank_kernels.lowrank_matmul as m\n"
        "print(m.__file__)\n"
    )
    result = _python(code, cwd)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("where", ["repo", "elsewhere"])
def test_module_lowrank_matmul_is_not_shadowed_by_its_function(where, tmp_path):
    """`lowrank_kernels.lowrank_matmul` is the module and its `lowrank_matmul` the function, both
    ways of importing them, after every package of ours has been imported (an `__init__` that
    re-exported the function once replaced the module on the package). An editable install maps
    kernels/ as a namespace package and would not run such an `__init__`: tests/test_layering.py
    catches it in the source."""
    cwd = REPO if where == "repo" else tmp_path
    code = textwrap.dedent("""
        import types, torch
        import lowrank, compress, compress.cli, compress.tune, compress.speed, lowrank.serving
        import lowrank_kernels.lowrank_matmul as m
        from lowrank_kernels.lowrank_matmul import lowrank_matmul
        import lowrank_kernels
        from lowrank_kernels import lowrank_matmul as via_package
        assert isinstance(m, types.ModuleType) and m.__name__ == "lowrank_kernels.lowrank_matmul", m
        assert lowrank_kernels.lowrank_matmul is m and via_package is m
        assert isinstance(lowrank_matmul, types.FunctionType) and m.lowrank_matmul is lowrank_matmul
        x, U, V = (torch.randn(*shape, dtype=torch.float64) for shape in ((2, 6), (5, 3), (3, 6)))
        torch.testing.assert_close(m.lowrank_matmul(x, U, V), x @ V.T @ U.T)
        torch.testing.assert_close(lowrank_matmul(x, U, V), x @ V.T @ U.T)
        print("ok")
    """)
    result = _python(code, cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_compress_help_from_another_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-m", "compress", "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: python -m compress")
    bench = subprocess.run([sys.executable, "-m", "compress", "bench", "--help"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert bench.returncode == 0, bench.stderr[-2000:]
    assert "--dense-fallback" in bench.stdout


def test_compressed_checkpoint_loads_with_plain_from_pretrained_and_generates(tmp_path):
    """Save in this process; load in a fresh one outside the repository with plain transformers."""
    from lowrank import factorize_, save_pretrained
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama()
    factorize_(model, lambda name, lin: 8)
    save_pretrained(model, tmp_path / "ckpt")
    code = (
        "import torch, transformers, lowrank\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained(r'{tmp_path / 'ckpt'}')\n"
        "assert type(m.model.layers[0].self_attn.q_proj).__name__ == 'LowRankLinear'\n"
        "ids = torch.randint(0, m.config.vocab_size, (1, 5))\n"
        "out = m.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)\n"
        "assert out.shape == (1, 11), out.shape\n"
        "print('generated', out.shape[1] - 5)\n"
    )
    result = _python(code, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "generated 6" in result.stdout


def test_package_data_is_found():
    """The tuned tables and the csrc/ sources the just-in-time build needs are found by the package."""
    import lowrank_kernels._ext as ext
    from lowrank_kernels import tuning

    assert tuning.CONFIG_PATH.is_file()
    assert all((ext._CSRC / name).is_file() for name in ext._SOURCES)
    assert importlib.util.find_spec("lowrank_kernels.csrc") is not None
