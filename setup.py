"""Build vllm-duo: the Python package, plus the CUDA extension ``vllm_duo._C`` when possible.

The extension is a plain shared library that registers ``torch.ops.vllm_duo.*`` through
TORCH_LIBRARY (no pybind, Py_LIMITED_API), so one build loads on any CPython that runs the
same torch. It is built when torch and a CUDA toolkit (nvcc) are present; otherwise the
package installs without it and any kernel use says so (``vllm_duo.ops``).

It must be built against the torch it will run with, which is whichever the installed vLLM
pins (0.26: torch 2.11, 0.33: torch 2.14). So torch is not a build requirement (pip would put
some other torch in its isolated build environment); the build uses the target environment's
torch, which pip's build isolation hides from ``sys.path`` but not from ``sysconfig``.
Arch list: ``TORCH_CUDA_ARCH_LIST`` (default "8.0;9.0"). ``VLLM_DUO_SKIP_EXT=1`` skips it.
"""

import glob
import os
import shutil
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_extension():
    if os.environ.get("VLLM_DUO_SKIP_EXT") == "1":
        print("vllm-duo: VLLM_DUO_SKIP_EXT=1, installing without the CUDA extension")
        return [], {}
    # torch computes CUDA_HOME when cpp_extension is imported, from nvcc on PATH; a wrapper
    # script there (e.g. /usr/local/bin/nvcc) makes it guess /usr/local and miss libcudart.
    if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    if not _target_torch_visible():
        print("vllm-duo: torch is not installed yet, installing without the CUDA extension; "
              "run the same pip install again once vLLM (and its torch) is installed to build it")
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    print(f"vllm-duo: building the CUDA extension against torch {torch.__version__}")
    if not (os.environ.get("CUDA_HOME") or shutil.which("nvcc")):
        print("vllm-duo: no CUDA toolkit (nvcc) found, installing without the CUDA extension")
        return [], {}
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    if not sources:
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    # torch 2.14's headers require C++20; 2.11 builds (and was validated) with C++17.
    std = "-std=c++20" if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 14) else "-std=c++17"
    ext = CUDAExtension(
        name="vllm_duo._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        py_limited_api=True,
        extra_compile_args={
            "cxx": ["-O3", std, "-DPy_LIMITED_API=0x030a0000"],
            "nvcc": ["-O3", std, "-lineinfo", "--expt-relaxed-constexpr",
                     "-DPy_LIMITED_API=0x030a0000"],
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


def _target_torch_visible() -> bool:
    """Make the install target's torch importable here; False when it has none."""
    for path in dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib")):
        if os.path.isdir(os.path.join(path, "torch")) and path not in sys.path:
            sys.path.append(path)  # after the build environment's own packages
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


ext_modules, cmdclass = _cuda_extension()

setup(
    name="vllm-duo",
    version="0.1.0",
    description="DuoAttention (retrieval + streaming heads) as a vLLM attention backend plugin",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["vllm_duo", "vllm_duo.*"]),
    # Built-in head patterns (TSV + config.json per model) and DuoAttention's MIT notice.
    package_data={"vllm_duo": ["pattern_data/LICENSE.duo-attention", "pattern_data/*/config.json",
                               "pattern_data/*/full_attention_heads.tsv"]},
    # Each vLLM pins its own torch (0.26: 2.11, 0.33: 2.14); the plugin's version check refuses
    # the releases in between, which it was not tested on.
    install_requires=["vllm>=0.26,<0.34", "numpy", "matplotlib", "tqdm"],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6"],
        "ray": ["ray[default]>=2.40"],
    },
    entry_points={
        "vllm.general_plugins": ["duo = vllm_duo.plugin:register"],
        "console_scripts": ["vllm-duo = vllm_duo.cli.main:main"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
