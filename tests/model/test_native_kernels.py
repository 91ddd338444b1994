"""The native CPU kernels (model/kernels/cpu/): the quantized matmul against the dequantized float matmul,
paged attention (and its fused RoPE + cache write) against the torch layers, the norm and SwiGLU glue against
torch, and each bitwise independent of which other rows share a call."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model.kernels import native
from model.network.attention import AttentionMetadata, as_cached, native_rotary_attention, paged_attention
from model.network.layers import apply_rope
from model.quantization.int4 import GROUP_SIZE, quantize_groups, quantize_groups_int8
from model.quantization.native_codes import NativeQuantizedLinear
from tests.native_cpu import needs_native


pytestmark = needs_native


@pytest.fixture(autouse=True, scope="module")
def kernels_built():
    assert native.load(), "the native CPU kernels did not build (see the log line above)"


def dequantized(layer_bits: int, weight: torch.Tensor) -> torch.Tensor:
    """The weights the layer computes with: its codes, scales and minimums rounded to float16 as it keeps them."""
    n, k = weight.shape
    if layer_bits == 4:
        codes, scale, low = quantize_groups(weight)
        groups = codes.reshape(n, -1, GROUP_SIZE) * scale.half().float()[..., None] + low.half().float()[..., None]
    else:
        codes, scale = quantize_groups_int8(weight)
        groups = codes.reshape(n, -1, GROUP_SIZE) * scale.half().float()[..., None]
    return groups.reshape(n, k)


def make_layer(bits: int, n: int, k: int, bias: bool,
               seed: int) -> tuple[NativeQuantizedLinear, torch.Tensor, nn.Linear]:
    torch.manual_seed(seed)
    linear = nn.Linear(k, n, bias=bias)
    layer = NativeQuantizedLinear.int4(linear) if bits == 4 else NativeQuantizedLinear.int8(linear)
    return layer, dequantized(bits, linear.weight.detach()), linear


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n,k,bias", [(96, 160, True), (40, 64, False), (960, 576, False)])  # 40: a padded block
def test_quantized_matmul_matches_the_dequantized_weights(bits, n, k, bias):
    layer, weight, linear = make_layer(bits, n, k, bias, seed=n + k)
    x = torch.randn(37, k)
    expected = x @ weight.T + (linear.bias.detach() if bias else 0)
    got = layer(x)
    assert got.dtype == torch.float32 and got.shape == (37, n)
    # 16-bit activations: float32 rounding, not quantization, is what remains
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    got16 = layer(x.bfloat16())
    assert got16.dtype == torch.bfloat16
    torch.testing.assert_close(got16.float(), expected, rtol=2e-2, atol=1e-2 * float(expected.abs().max()))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_computes_the_same_bits_whatever_shares_its_call(bits, dtype):
    """Tiles of 8, 4, 2 and 1 rows and chunks of 64 rows per task: every split must give the same sums."""
    layer, *_ = make_layer(bits, 200, 192, True, seed=3)
    x = torch.randn(150, 192).to(dtype)
    together = layer(x)
    for rows in (slice(0, 1), slice(5, 8), slice(17, 90), slice(63, 150), slice(149, 150)):
        assert torch.equal(layer(x[rows]), together[rows]), rows
    alone = torch.cat([layer(x[i:i + 1]) for i in range(len(x))])
    assert torch.equal(alone, together)


def test_quantized_matmul_refuses_mismatched_operands():
    layer, *_ = make_layer(4, 32, 64, False, seed=0)
    with pytest.raises(RuntimeError, match="codes do not match"):
        layer(torch.randn(2, 96))
    with pytest.raises(ValueError, match="divisible by 32"):
        NativeQuantizedLinear.int4(nn.Linear(40, 8))


def cached_step(query_lens, context_lens, dtype, kv_dtype, window, seed=0):
    """A step over random K/V already in a cache (each sequence's 8 blocks scattered), and its new tokens."""
    gen = torch.Generator().manual_seed(seed)
    nh, n_kv, hd, block = 9, 3, 64, 16
    tables = torch.randperm(8 * len(query_lens), generator=gen).reshape(len(query_lens), 8).tolist()
    k_cache = torch.randn(8 * len(query_lens) * block, n_kv, hd, generator=gen).to(kv_dtype)
    v_cache = torch.randn(k_cache.shape, generator=gen).to(kv_dtype)
    t = sum(query_lens)
    q, k, v = (torch.randn(t, heads, hd, generator=gen).to(dtype) for heads in (nh, n_kv, n_kv))
    return tables, (k_cache, v_cache), q, k, v, block


def attend(step, query_lens, context_lens, window, native_attention: bool, softcap: float | None = None):
    tables, (k_cache, v_cache), q, k, v, block = step
    meta = AttentionMetadata.build(query_lens, context_lens, tables, block, window, native_attention=native_attention)
    return paged_attention(q, k, v, (k_cache.clone(), v_cache.clone()), meta, 64 ** -0.5, softcap)


@pytest.mark.parametrize("window", [None, 20])
def test_native_attention_soft_caps_scores_as_the_torch_reference_does(window):
    """Gemma 2's cap * tanh(score / cap), with a cap small enough that most scores are bent by it."""
    query_lens, context_lens = [1, 37, 1, 5, 100], [50, 37, 3, 70, 128]
    step = cached_step(query_lens, context_lens, torch.float32, torch.float32, window)
    got = attend(step, query_lens, context_lens, window, native_attention=True, softcap=1.5)
    expected = attend(step, query_lens, context_lens, window, native_attention=False, softcap=1.5)
    uncapped = attend(step, query_lens, context_lens, window, native_attention=False)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)
    assert (expected - uncapped).abs().max() > 0.1  # the cap changed the answer


@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("dtype,kv_dtype,atol", [(torch.float32, torch.float32, 2e-6),
                                                 (torch.float32, torch.bfloat16, 2e-6),
                                                 (torch.float32, torch.float16, 2e-6),
                                                 (torch.bfloat16, torch.bfloat16, 1e-2),
                                                 (torch.bfloat16, torch.float16, 1e-2)])
def test_native_attention_matches_the_torch_reference(window, dtype, kv_dtype, atol):
    query_lens, context_lens = [1, 37, 1, 5, 100], [50, 37, 3, 70, 128]
    step = cached_step(query_lens, context_lens, dtype, kv_dtype, window)
    got = attend(step, query_lens, context_lens, window, native_attention=True)
    if dtype != kv_dtype:  # the torch reference attends in one dtype: float32, K/V rounded as the cache holds them
        tables, cache, q, k, v, block = step
        step = (tables, tuple(c.float() for c in cache), q.float(), k.to(kv_dtype).float(), v.to(kv_dtype).float(),
                block)
    expected = attend(step, query_lens, context_lens, window, native_attention=False)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=atol)


def test_native_attention_of_a_token_does_not_depend_on_its_step():
    """The same sequences attended in one step, one at a time, and with their new tokens split in two."""
    query_lens, context_lens = [1, 37, 5, 100], [50, 37, 70, 128]
    tables, cache, q, k, v, block = step = cached_step(query_lens, context_lens, torch.float32, torch.float32, None)
    together = attend(step, query_lens, context_lens, None, native_attention=True)
    start = 0
    for i, (n, ctx) in enumerate(zip(query_lens, context_lens)):
        rows = slice(start, start + n)
        alone = attend(([tables[i]], cache, q[rows], k[rows], v[rows], block), [n], [ctx], None, True)
        assert torch.equal(alone, together[rows]), i
        if n > 1:  # the first part's K/V must be in the cache for the second: write both, attend the second
            first = n // 2
            later = slice(start + first, start + n)
            k_cache, v_cache = (c.clone() for c in cache)
            meta = AttentionMetadata.build([first], [ctx - n + first], [tables[i]], block, native_attention=True)
            paged_attention(q[start:start + first], k[start:start + first], v[start:start + first],
                            (k_cache, v_cache), meta, 64 ** -0.5)
            second = attend(([tables[i]], (k_cache, v_cache), q[later], k[later], v[later], block), [n - first],
                            [ctx], None, True)
            assert torch.equal(second, together[later]), i
        start += n


@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_prefill_token_attends_as_it_would_decoded_alone(window, kv_dtype):
    """A prefill's tokens are attended in runs of 16 that read each block of keys once (attention.cpp): each
    token must still give the bits it gives as a one-token step over the same cache, window or not."""
    query_lens, context_lens = [45], [70]
    tables, cache, q, k, v, block = cached_step(query_lens, context_lens, torch.float32, kv_dtype, window, seed=7)
    k_cache, v_cache = (c.clone() for c in cache)
    meta = AttentionMetadata.build(query_lens, context_lens, tables, block, window, native_attention=True)
    together = paged_attention(q, k, v, (k_cache, v_cache), meta, 64 ** -0.5)  # leaves all 70 keys cached
    for i in range(45):
        step = AttentionMetadata.build([1], [70 - 45 + i + 1], tables, block, window, native_attention=True)
        alone = paged_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], (k_cache, v_cache), step, 64 ** -0.5)
        assert torch.equal(alone, together[i:i + 1]), i


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_the_glue_ops_match_torch_and_compute_each_row_alone(dtype, tol):
    gen = torch.Generator().manual_seed(9)
    shapes = ((40, 576), (40, 576), (40, 3072))
    x, delta, h = (torch.randn(rows, width, generator=gen).to(dtype) for rows, width in shapes)
    weight = torch.rand(576, generator=gen) + 0.5
    total, normed = torch.ops.kvserve.add_rms_norm(x, delta, weight, 1e-5)
    expected_total = (x.float() + delta.float()).to(dtype)
    assert torch.equal(total, expected_total)
    expected = F.rms_norm(expected_total.float(), (576,), weight, 1e-5)
    torch.testing.assert_close(normed.float(), expected, rtol=tol, atol=tol)
    gate, up = h.float().chunk(2, dim=-1)
    torch.testing.assert_close(torch.ops.kvserve.silu_mul(h).float(), F.silu(gate) * up, rtol=tol, atol=tol)
    for rows in (slice(0, 1), slice(7, 30)):
        assert torch.equal(torch.ops.kvserve.add_rms_norm(x[rows], delta[rows], weight, 1e-5)[1], normed[rows])
        assert torch.equal(torch.ops.kvserve.silu_mul(h[rows]), torch.ops.kvserve.silu_mul(h)[rows])


@pytest.mark.parametrize("rope,kv_dtype", [(True, torch.float32), (False, torch.float32), (True, torch.float16)])
def test_rotary_attention_rotates_writes_and_attends_as_the_torch_layers_do(rope, kv_dtype):
    query_lens, context_lens = [1, 37, 5], [50, 37, 70]
    tables, cache, *_ , block = cached_step(query_lens, context_lens, torch.float32, kv_dtype, None)
    t, nh, n_kv, hd = sum(query_lens), 9, 3, 64
    qkv = torch.randn(t, (nh + 2 * n_kv) * hd, generator=torch.Generator().manual_seed(4))
    qkv[3, -1] = 1e6  # a value float16 cannot hold: both paths cache its largest finite value instead
    angles = torch.rand(t, hd // 2) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    meta = AttentionMetadata.build(query_lens, context_lens, tables, block, native_attention=True)
    native_cache = tuple(c.clone() for c in cache)
    got = native_rotary_attention(qkv, (cos[:, None], sin[:, None]) if rope else None, meta, native_cache,
                                  hd ** -0.5, nh)
    qk = qkv[:, : (nh + n_kv) * hd].view(t, nh + n_kv, hd)
    if rope:
        qk = apply_rope(qk, cos[:, None], sin[:, None])
    v = qkv[:, (nh + n_kv) * hd:].view(t, n_kv, hd)
    torch_cache = tuple(c.clone() for c in cache)
    reference = AttentionMetadata.build(query_lens, context_lens, tables, block, native_attention=False)
    # the torch layers attend a prompt's new K/V as computed, the native kernel as cached: round them first
    k, v = (as_cached(x, kv_dtype).float() for x in (qk[:, nh:], v))
    expected = paged_attention(qk[:, :nh], k, v, torch_cache, reference, hd ** -0.5)
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-6)  # rtol: outputs near the huge value
    for ours, theirs in zip(native_cache, torch_cache):  # the same K/V written to the same slots
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert native_cache[1].float().abs().max() == (1e6 if kv_dtype == torch.float32 else 65504)
