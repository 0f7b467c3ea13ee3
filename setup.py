"""Build script: pure Python everywhere, plus the optional CUDA extension in csrc/.

The extension is built only where a CUDA toolkit and a CUDA build of torch are both
present. Environment switches:

- ``LOWRANK_SKIP_CUDA_BUILD=1``  never build the extension (pure Python install).
- ``TORCH_CUDA_ARCH_LIST``        architectures to build for (default "9.0" here, torch's usual syntax).
- ``MAX_JOBS``                    cap on parallel compile jobs (ninja), default 4.

Without the extension everything still works: ``lowrank_kernels`` falls back to Triton or
torch, and can also build the same sources just in time (``lowrank_kernels._ext``).
"""

import glob
import os
import sys

from setuptools import setup


def _cuda_extension_modules() -> tuple[list, dict]:
    if os.environ.get("LOWRANK_SKIP_CUDA_BUILD", "0") == "1":
        print("lowrank-kit: LOWRANK_SKIP_CUDA_BUILD=1, installing pure Python", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as exc:  # torch missing in an isolated build env, etc.
        print(f"lowrank-kit: torch not importable at build time ({exc}); installing pure Python", file=sys.stderr)
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        print("lowrank-kit: no CUDA toolkit or CPU-only torch; installing pure Python", file=sys.stderr)
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    os.environ.setdefault("MAX_JOBS", "4")
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return [], {}
    ext = CUDAExtension(
        name="lowrank_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
