"""Build vllm-duo: the Python package, plus the CUDA extension ``vllm_duo._C`` when possible.

The extension is a plain shared library that registers ``torch.ops.vllm_duo.*`` through
TORCH_LIBRARY (no pybind, Py_LIMITED_API), so one build loads on any CPython that runs the
same torch. It is built when torch and a CUDA toolkit (nvcc) are present; otherwise the
package installs without it and any kernel use says so (``vllm_duo.ops``).
Arch list: ``TORCH_CUDA_ARCH_LIST`` (default "8.0;9.0"). ``VLLM_DUO_SKIP_EXT=1`` skips it.
"""

import glob
import os
import shutil

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
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        print("vllm-duo: torch is not importable at build time, installing without the CUDA extension")
        return [], {}
    if not (os.environ.get("CUDA_HOME") or shutil.which("nvcc")):
        print("vllm-duo: no CUDA toolkit (nvcc) found, installing without the CUDA extension")
        return [], {}
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    if not sources:
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext = CUDAExtension(
        name="vllm_duo._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        py_limited_api=True,
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17", "-DPy_LIMITED_API=0x030a0000"],
            "nvcc": ["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr",
                     "-DPy_LIMITED_API=0x030a0000"],
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


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
    install_requires=["vllm==0.26.0", "torch==2.11.0", "numpy", "matplotlib", "tqdm"],
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
