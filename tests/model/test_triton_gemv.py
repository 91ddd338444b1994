"""model/triton_gemv.py outside the kernel's arithmetic (that is checked in Triton's interpreter by
test_triton_decode.py, cases gemv-* and model-*-gemv): which calls reach the kernel, what it refuses,
and, on a CUDA device, start-up tuning."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
from model import triton_gemv  # noqa: E402
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tuning_on_cuda_records_a_choice_that_computes_the_projection():
    config = tiny("smollm2-135m")
    model = build_model(config, random_weights(config), "random", torch.bfloat16, "cuda")
    results = triton_gemv.tune_model(model, [1, 4, 32])
    linears = {(*m.weight.shape, m.bias is not None) for m in model.modules() if type(m) is torch.nn.Linear}
    assert {(r.shape, r.rows) for r in results} == {(s[:2], rows) for s in linears for rows in (1, 4)}
    assert all(r.best_us <= r.cublas_us for r in results)
    layer = model.layers[0].ffn.down_proj
    x = torch.randn(4, layer.weight.shape[1], dtype=torch.bfloat16, device="cuda")
    ref = F.linear(x.float(), layer.weight.float())
    assert float((triton_gemv.linear(x, layer.weight, None).float() - ref).abs().max()) <= ref.abs().max() / 64
