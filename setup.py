"""Build script for kldiv's optional C kernels.

The kernels are plain C (CPython API only, no NumPy headers), compiled once at install time.
No ``-march=native``: each kernel is compiled for the baseline ISA and selects AVX2/AVX-512
versions at run time (GCC ``target_clones``), so one binary runs on every x86-64 CPU.
If compilation fails, installation still succeeds and kldiv falls back to pure torch/NumPy.
"""
import sys

from setuptools import Extension, setup

COMMON = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-std=c11"]
OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []

ext_modules = [
    # Fused softmax-divergence rows with gradient (issue 3): src/kldiv/_ext/fused.c
    Extension(
        "kldiv._ext._fused",
        sources=["src/kldiv/_ext/fused.c"],
        depends=["src/kldiv/_ext/kl_simd.h"],
        extra_compile_args=COMMON + OPENMP,
        extra_link_args=OPENMP,
        optional=True,
    ),
    # Row statistics for `kldiv compare` (issue 5): src/kldiv/_ext/rowstats.c
    Extension(
        "kldiv._ext._rowstats",
        sources=["src/kldiv/_ext/rowstats.c"],
        depends=["src/kldiv/_ext/kl_simd.h", "src/kldiv/_ext/kl_rows.h"],
        extra_compile_args=COMMON + OPENMP,
        extra_link_args=OPENMP,
        optional=True,
    ),
    # NumPy divergences of probabilities, log-probabilities and logits (issue 12 item 4):
    # src/kldiv/_ext/divrows.c
    Extension(
        "kldiv._ext._divrows",
        sources=["src/kldiv/_ext/divrows.c"],
        depends=["src/kldiv/_ext/kl_simd.h", "src/kldiv/_ext/kl_rows.h"],
        extra_compile_args=COMMON + OPENMP,
        extra_link_args=OPENMP,
        optional=True,
    ),
]

setup(ext_modules=ext_modules)
