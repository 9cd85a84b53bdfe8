"""Builds fastcse._C (kernels/): a CppExtension with CPU torch, a CUDAExtension where torch has
CUDA and the toolkit is found (CUDA_HOME), FASTCSE_NO_CUDA=1 to force the CPU build. Package
metadata lives in pyproject.toml; install with ``pip install --no-build-isolation -e .`` (the
extension compiles against the torch already installed)."""

import os

import torch
from setuptools import setup
from torch.utils import cpp_extension

SOURCES = ["kernels/gather_rows.cpp"]
CUDA_SOURCES = ["kernels/pack_cuda.cu"]


def _extension():
    # FASTCSE_PYTHON_MODULE: the library is also a Python module (`import fastcse._C`).
    define_macros = [("FASTCSE_PYTHON_MODULE", None)]
    cxx = ["-O2"]
    with_cuda = (cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
                 and os.environ.get("FASTCSE_NO_CUDA") != "1")
    if with_cuda:
        define_macros.append(("FASTCSE_WITH_CUDA", None))
        return cpp_extension.CUDAExtension("fastcse._C", SOURCES + CUDA_SOURCES, define_macros=define_macros,
                                           extra_compile_args={"cxx": cxx, "nvcc": ["-O2"]})
    return cpp_extension.CppExtension("fastcse._C", SOURCES, define_macros=define_macros,
                                      extra_compile_args={"cxx": cxx})


setup(ext_modules=[_extension()], cmdclass={"build_ext": cpp_extension.BuildExtension})
