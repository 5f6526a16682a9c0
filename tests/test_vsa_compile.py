"""The VSA attention kernels compile for an RTX 4090 (sm_89) within its shared memory, offline.

Most FastWan users run Ada GPUs: no bulk tensor copies (TMA), no wgmma, and 99 KB of shared memory
per block where the H200 the benchmarks run on has 227 KB. No such GPU is lent to us, so this
compiles every launch production makes on one (``launches.ATTENTION_LAUNCHES`` for small shared
memory, ``ops._list_flags``, head dims 64 and 128, bf16) with Triton's own compiler for target sm_89, on the
CPU, and checks each kernel's shared memory against the limit. A launch configuration that only fits
a Hopper GPU fails here instead of with "out of resources" in a user's ComfyUI.

The compiles run in a child process without TRITON_INTERPRET: without a GPU the suite runs under
the interpreter (tests/conftest.py), and kernels jitted there are interpreter functions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ADA_SHARED_MEMORY_PER_BLOCK = 99 * 1024  # sm_86/sm_89 opt-in maximum (CUDA programming guide)

# Argument kinds by name (the kernels' signatures; anything else is an int32 scalar).
_PROJECTIONS = {"Q", "K", "V", "G", "O", "DO", "DQ", "DK", "DV"}
_FP32_POINTERS = {"COARSE", "LSE", "DELTA", "DQ_COARSE", "DK_COARSE", "DV_COARSE"}
_INT32_POINTERS = {"KEY_ENTRIES", "KEY_COUNTS", "TILE_OFF", "TILE_LIST", "QUERY_ENTRIES", "QUERY_OFF",
                   "QUERY_COUNTS"}
_FP32_SCALARS = {"qk_scale", "sm_scale"}
_INT32_SCALARS = {"H", "NUM_TILES", "TOPK", "L"}


def _signature(fn, constexprs: dict) -> dict:
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _PROJECTIONS:
            signature[name] = "*bf16"
        elif name in _FP32_POINTERS:
            signature[name] = "*fp32"
        elif name in _INT32_POINTERS:
            signature[name] = "*i32"
        elif name in _FP32_SCALARS:
            signature[name] = "fp32"
        elif name.islower() or name in _INT32_SCALARS:  # strides and sizes
            signature[name] = "i32"
        else:
            raise AssertionError(f"unknown kernel argument {name}: add it to this test's signature table")
    return signature


def _production_launches():
    """(kernel, D, rows, grid has partial tiles) of every launch ``ops`` makes."""
    for D in (64, 128):
        for kernel in ("fwd", "bwd_dq", "bwd_dkdv"):
            yield kernel, D, 64, False  # e.g. the training shape: whole tiles only
            for rows in (64, 32, 16):
                yield kernel, D, rows, True  # e.g. 480p: 64-, 32- and 16-row groups


def compile_for_ada() -> dict:
    """{launch: shared memory bytes, or the compile error} for every production launch on sm_89."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastwan.kernels.vsa import ops as vsa_ops
    from fastwan.kernels.vsa import triton_vsa
    from fastwan.kernels.vsa.launches import Device

    rtx_4090 = Device(interpreted=False, tensor_descriptors=False, large_shared_memory=False)  # < 160 KB per block
    results = {}
    for kernel, D, rows, partial in _production_launches():
        groups = [(64, 0, 1)] + ([(32, 1, 1), (16, 2, 1)] if partial else [])
        config = rtx_4090.attention_launch(kernel, D, rows)
        constexprs = dict(D=D, ENTRY_SIZE_BITS=vsa_ops._ENTRY_SIZE_BITS, USE_TMA=False,
                          **vsa_ops._list_flags(kernel, rows, groups))
        if kernel == "bwd_dkdv":
            constexprs.update(HAS_COARSE=True, BLOCK_N=rows)
        elif kernel == "bwd_dq":
            constexprs.update(HAS_COARSE=True, BLOCK_M=rows)
        else:
            constexprs.update(HAS_GATE=True, BLOCK_M=rows)
        fn = getattr(triton_vsa, f"{kernel}_kernel")
        name = f"{kernel} D={D} {rows} rows{' (grid with partial tiles)' if partial else ''} {config}"
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=_signature(fn, constexprs), constexprs=constexprs),
                                      target=GPUTarget("cuda", 89, 32), options=config)
            results[name] = compiled.metadata.shared
        except Exception as exc:  # reported by the test with the launch it belongs to
            results[name] = f"{type(exc).__name__}: {str(exc)[-500:]}"
    return results


@pytest.mark.slow
def test_attention_kernels_compile_for_an_rtx_4090_within_its_shared_memory():
    pytest.importorskip("triton.backends.nvidia")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    child = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=1200)
    assert child.returncode == 0, child.stderr[-3000:]
    results = json.loads(child.stdout.strip().splitlines()[-1])
    assert len(results) == len(list(_production_launches()))
    too_large = {name: shared for name, shared in results.items()
                 if not isinstance(shared, int) or not 0 < shared <= ADA_SHARED_MEMORY_PER_BLOCK}
    assert not too_large, f"launches that do not fit sm_89's {ADA_SHARED_MEMORY_PER_BLOCK} bytes: {too_large}"


if __name__ == "__main__":
    print(json.dumps(compile_for_ada()))
