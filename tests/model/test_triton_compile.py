"""Every Triton kernel compiles to a Hopper (sm_90) binary, here, without a GPU.

The interpreter cases (test_triton_interpreter.py) check what the kernels compute, but the interpreter runs
Python, not Triton's compiler: a kernel can pass them and still fail to compile for the device (a type
that changes across a branch, an unsupported construct). Triton ships ptxas, so each variant the
wrappers launch is compiled ahead of time for the H100/H200 target, in bfloat16 and float32.
"""
from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from model.kernels import decode, fused, gemv  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
# Pointer arguments that are not in the model's dtype; everything else not listed is an int32 scalar.
POINTER_TYPES = {"tables_ptr": "*i32", "ctx_ptr": "*i32", "slots_ptr": "*i64", "part_ptr": "*fp32",
                 "stats_ptr": "*fp32"}
FLOAT_SCALARS = {"scale", "eps"}
# Arguments that real launches pass as multiples of 16 (Triton specialises on that at run time; it is what
# lets the GEMV's loads become pipelined asynchronous copies, so compile that variant).
ALIGNED = {"x_ptr", "w_ptr", "bias_ptr", "out_ptr", "part_ptr", "delta_ptr", "norm_ptr", "residual_ptr", "n", "k",
           "stride_x", "stride_delta", "stride_w", "k_per_split"}

DECODE, MERGE = decode._kernels()
ADD_RMS_NORM, ROPE_STORE_KV, SILU_AND_MUL = fused._kernels()
GEMV, GEMV_REDUCE = gemv._kernels()
VARIANTS = {  # kernel, its compile-time constants, as the wrappers pass them for real models
    **{f"decode-split{s}-window{w}": (DECODE, dict(GROUP=4, GROUP_PAD=4, HEAD_DIM=64, HEAD_PAD=64, BLOCK_SIZE=16,
                                                    TILE=decode.TILE, HAS_WINDOW=w, SPLIT=s))
       for s in (False, True) for w in (False, True)},
    "decode-gqa3-head80": (DECODE, dict(GROUP=3, GROUP_PAD=4, HEAD_DIM=80, HEAD_PAD=128, BLOCK_SIZE=16,
                                        TILE=decode.TILE, HAS_WINDOW=False, SPLIT=True)),
    "merge": (MERGE, dict(HEAD_DIM=80, HEAD_PAD=128, SPLITS_PAD=decode.MAX_SPLITS)),
    "add-rms-norm": (ADD_RMS_NORM, dict(HAS_DELTA=True, BLOCK=2048)),
    "rms-norm": (ADD_RMS_NORM, dict(HAS_DELTA=False, BLOCK=1024)),
    "rope-store-kv": (ROPE_STORE_KV, dict(NUM_HEADS=32, NUM_KV_HEADS=8, HEAD_DIM=64, HALF_PAD=32)),
    "silu-and-mul": (SILU_AND_MUL, dict(BLOCK=fused.SILU_BLOCK)),
    **{f"gemv-{c.block_n}x{c.block_k}-split{c.split > 1}-bias{b}-prologue{p}": (
        GEMV, dict(BLOCK_N=c.block_n, BLOCK_K=c.block_k, SPLIT=c.split > 1, HAS_BIAS=b, EXACT=False, PROLOGUE=p,
                   HAS_DELTA=p == gemv.ADD_NORM))
       for c in gemv.CANDIDATES[:5] for b in (False, True)
       for p in (gemv.LINEAR, gemv.SILU_MUL, gemv.ADD_NORM)},
    "gemv-exact-norm-no-delta": (GEMV, dict(BLOCK_N=16, BLOCK_K=256, SPLIT=True, HAS_BIAS=True, EXACT=True,
                                            PROLOGUE=gemv.ADD_NORM, HAS_DELTA=False)),
    "gemv-reduce": (GEMV_REDUCE, dict(HAS_BIAS=True, BLOCK=gemv.REDUCE_BLOCK)),
}


def signature(kernel, dtype: str) -> dict[str, str]:
    types = {}
    for param in kernel.params:
        name = param.name
        if param.is_constexpr:
            types[name] = "constexpr"
        elif name.endswith("_ptr"):
            types[name] = POINTER_TYPES.get(name, "*" + dtype)
        else:
            types[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    return types


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_kernel_compiles_for_hopper(variant, dtype):
    kernel, constants = VARIANTS[variant]
    aligned, options = {}, {}
    if kernel is GEMV:  # as gemv() launches it
        aligned = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(kernel.params) if p.name in ALIGNED}
        options = {"num_stages": gemv.CANDIDATES[0].num_stages}
    compiled = triton.compile(ASTSource(kernel, signature(kernel, dtype), constants, aligned), target=HOPPER,
                              options=options)
    assert ".entry" in compiled.asm["ptx"] and len(compiled.asm["cubin"]) > 0
