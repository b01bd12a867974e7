"""tests/test_code_attention.py skips where the CPU kernel cannot be built (no C compiler). Where a
compiler is on PATH the kernel must build and load: a broken source or a stale ABI number would
otherwise only turn those tests into skips."""

from __future__ import annotations

import os
import shutil

import pytest

from kvquant.kernels import cpu as cpu_kernels


def test_the_cpu_kernel_builds_where_there_is_a_c_compiler():
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc!r}) on PATH: the kernel's tests skip, decoding dequantizes")
    ok, why = cpu_kernels.available()
    assert ok, why
