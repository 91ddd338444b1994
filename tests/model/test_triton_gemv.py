"""model/triton_gemv.py outside the kernel's arithmetic (that is checked in Triton's interpreter by
test_triton_decode.py, cases gemv-* and model-*-gemv): which calls reach the kernel, what it refuses,
and, on a CUDA device, start-up tuning."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
from model import triton_fused, triton_gemv  # noqa: E402
from model.config import tiny  # noqa: E402
from model.loading import build_model  # noqa: E402
from model.weights import random_weights  # noqa: E402


@pytest.fixture
def spy(monkeypatch):
    calls = []
    monkeypatch.setattr(triton_gemv, "gemv", lambda x, w, b, config: calls.append(config) or F.linear(x, w, b))
    return calls


def test_linear_without_a_plan_is_f_linear(spy):
    x, w, b = torch.randn(3, 40), torch.randn(24, 40), torch.randn(24)
    assert torch.equal(triton_gemv.linear(x, w, b), F.linear(x, w, b))
    assert spy == []


def test_linear_takes_the_planned_kernel_only_for_its_shape_and_row_count(spy):
    w, b = torch.randn(24, 40), torch.randn(24)
    config = triton_gemv.CANDIDATES[1]
    triton_gemv.set_plan(w, b, 3, config)
    try:
        triton_gemv.linear(torch.randn(3, 40), w, b)
        assert spy == [config]
        triton_gemv.linear(torch.randn(2, 40), w, b)  # another row count
        triton_gemv.linear(torch.randn(3, 40), w, None)  # no bias: another plan
        triton_gemv.linear(*(t.to(torch.bfloat16) for t in (torch.randn(3, 40), w, b)))  # another dtype
        triton_gemv.linear(torch.randn(40, 3).t(), w, b)  # rows not contiguous
        assert spy == [config]
    finally:
        triton_gemv.set_plan(w, b, 3, None)


def test_gemv_refuses_what_it_cannot_compute():
    w = torch.randn(24, 40)
    with pytest.raises(ValueError, match="<= 16"):
        triton_gemv.gemv(torch.randn(17, 40), w, None, triton_gemv.CANDIDATES[0])
    with pytest.raises(ValueError, match="one dtype"):
        triton_gemv.gemv(torch.randn(2, 40, dtype=torch.float64), w, None, triton_gemv.CANDIDATES[0])
    with pytest.raises(ValueError, match=r"\(2, 41\)"):
        triton_gemv.gemv(torch.randn(2, 41), w, None, triton_gemv.CANDIDATES[0])
    with pytest.raises(ValueError, match=r"K x 2"):
        triton_gemv.gemv(torch.randn(2, 40), w, None, triton_gemv.CANDIDATES[0], silu_mul=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tuning_on_cuda_records_a_choice_that_computes_the_projection():
    config = tiny("smollm2-135m")
    model = build_model(config, random_weights(config), "random", torch.bfloat16, "cuda")
    results = triton_gemv.tune_model(model, [1, 4, 32])
    linears = {m.weight.shape for m in model.modules() if type(m) is torch.nn.Linear}
    down = model.layers[0].ffn.down_proj.weight
    expected = {(tuple(s), rows, False) for s in linears for rows in (1, 4)} | {(tuple(down.shape), rows, True)
                                                                                for rows in (1, 4)}
    assert {(r.shape, r.rows, r.silu_mul) for r in results} == expected
    assert all(r.best_us <= r.unfused_us for r in results)
    h = torch.randn(4, 2 * down.shape[1], dtype=torch.bfloat16, device="cuda")
    product = triton_fused.silu_and_mul(h)
    ref = F.linear(product.float(), down.float())
    for out in (triton_gemv.linear(product, down, None), triton_gemv.silu_mul_linear(h, down, None)):
        assert float((out.float() - ref).abs().max()) <= ref.abs().max() / 64
