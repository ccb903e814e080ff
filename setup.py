"""Build the mtrobust_fast._C extension against the torch that is already installed.

Install with ``pip install --no-build-isolation .`` (or ``-e .``). The CUDA kernels are compiled only
when the installed torch has CUDA and nvcc is found (set MTROBUST_FAST_CUDA=0 to force a CPU-only build).
The source list lives in csrc/sources.txt, shared with CMakeLists.txt.
"""
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def read_sources():
    """Map each kind in csrc/sources.txt to its list of paths."""
    kinds = {}
    for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            kind, path = line.split()
            kinds.setdefault(kind, []).append(path)
    return kinds


def extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    sources = read_sources()
    want_cuda = os.environ.get("MTROBUST_FAST_CUDA", "auto")
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and want_cuda != "0"
    if want_cuda == "1" and not with_cuda:
        raise RuntimeError("MTROBUST_FAST_CUDA=1 but torch has no CUDA or nvcc was not found")
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"] if os.name != "nt" else ["/O2"]
    if not with_cuda:
        return [CppExtension("mtrobust_fast._C", sources["cpp"], extra_compile_args={"cxx": cxx},
                             extra_link_args=["-fopenmp"], include_dirs=[str(ROOT / "csrc")])]
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]
    if not arch:
        nvcc += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    return [CUDAExtension("mtrobust_fast._C", sources["cpp"] + sources["cuda_glue"] + sources["cu"],
                          define_macros=[("MTROBUST_WITH_CUDA", "1")],
                          extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"],
                          include_dirs=[str(ROOT / "csrc")])]


def build_ext():
    from torch.utils.cpp_extension import BuildExtension
    return BuildExtension.with_options(use_ninja=True)


setup(
    name="mtrobust-fast",
    version="0.1.0",
    description="Fast adversarial attacks and robustness sweeps for multi-task vision models",
    packages=find_packages(include=["mtrobust_fast", "mtrobust_fast.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "scipy", "tqdm", "pillow", "pandas", "matplotlib", "pyarrow", "pyyaml",
                      "torchjd[quadprog-projector]==0.18.0"],
    extras_require={"test": ["pytest", "hypothesis", "comet_ml", "ray", "scikit-image"]},
    entry_points={"console_scripts": ["mtrobust-fast=mtrobust_fast.cli:main"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": build_ext()},
    zip_safe=False,
)
