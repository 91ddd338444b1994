"""model/kernels/plan.py and model/kernels/gemv.py outside the kernel's arithmetic (that is checked in
Triton's interpreter by test_triton_interpreter.py, cases gemv-* and model-*-gemv): which calls reach the
kernel, what it refuses, and, on a CUDA device, start-up tuning."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
from model.kernels import gemv, plan  # noqa: E402
from model.kernels.fused import silu_and_mul  # noqa: E402
from model.kernels.plan import KernelPlan  # noqa: E402
from model.config import tiny  # noqa: E402
from model.loading import build_model  # noqa: E402
from model.loading.weights import random_weights  # noqa: E402


@pytest.fixture
def spy(monkeypatch):
    calls = []
    monkeypatch.setattr(plan, "gemv", lambda x, w, b, config: calls.append(config) or F.linear(x, w, b))
    return calls


def test_linear_without_a_plan_is_f_linear(spy):
    x, w, b = torch.randn(3, 40), torch.randn(24, 40), torch.randn(24)
    assert torch.equal(KernelPlan().linear(x, w, b), F.linear(x, w, b))
    assert spy == []


def test_linear_takes_the_planned_kernel_only_for_its_kind_shape_and_row_count(spy):
    w, b = torch.randn(24, 40), torch.randn(24)
    config, kernels = gemv.CANDIDATES[1], KernelPlan()
    kernels.set_plan(gemv.LINEAR, w, b, 3, config)
    kernels.set_plan(gemv.ADD_NORM, w, b, 2, config)  # another kind: not linear()'s
    kernels.linear(torch.randn(3, 40), w, b)
    assert spy == [config]
    kernels.linear(torch.randn(2, 40), w, b)  # another row count
    kernels.linear(torch.randn(3, 40), w, None)  # no bias: another plan
    kernels.linear(*(t.to(torch.bfloat16) for t in (torch.randn(3, 40), w, b)))  # another dtype
    kernels.linear(torch.randn(40, 3).t(), w, b)  # rows not contiguous
    assert spy == [config]


def test_gemv_refuses_what_it_cannot_compute():
    w, config = torch.randn(24, 40), gemv.CANDIDATES[0]
    with pytest.raises(ValueError, match=r"<= 16"):
        gemv.gemv(torch.randn(17, 40), w, None, config)
    with pytest.raises(ValueError, match="one dtype"):
        gemv.gemv(torch.randn(2, 40, dtype=torch.float64), w, None, config)
    with pytest.raises(ValueError, match=r"\(2, 41\)"):
        gemv.gemv(torch.randn(2, 41), w, None, config)
    with pytest.raises(ValueError, match=r"\(<= 16, 80\)"):  # [gate | up] is twice the weight's K wide
        gemv.gemv(torch.randn(2, 40), w, None, config, silu_mul=True)
    with pytest.raises(ValueError, match="delta"):
        gemv.add_norm_gemv(torch.randn(2, 40), gemv.AddNorm(torch.randn(3, 40), torch.ones(40), 1e-5),
                           w, None, config)


def test_the_model_names_every_projection_whose_input_can_be_fused():
    config = tiny("smollm2-135m")
    model = build_model(config, random_weights(config), "random")
    sites = model.fused_projections()
    layer = model.layers[0]
    assert (gemv.ADD_NORM, layer.attn.qkv_proj) in sites and (gemv.ADD_NORM, layer.ffn.up_proj) in sites
    assert (gemv.SILU_MUL, layer.ffn.down_proj) in sites and (gemv.ADD_NORM, model.lm_head) in sites
    assert len(sites) == 3 * config.num_layers + 1
    gpt2 = tiny("gpt2")  # LayerNorm and GELU: nothing to fuse
    assert build_model(gpt2, random_weights(gpt2), "random").fused_projections() == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tuning_on_cuda_records_a_choice_that_computes_the_projection():
    config = tiny("smollm2-135m")
    model = build_model(config, random_weights(config), "random", torch.bfloat16, "cuda")
    kernels = KernelPlan()
    results = kernels.tune_model(model, [1, 4, 32])
    kinds = {(gemv.LINEAR, tuple(m.weight.shape)) for m in model.modules() if type(m) is torch.nn.Linear}
    kinds |= {(kind, tuple(m.weight.shape)) for kind, m in model.fused_projections()}
    assert {(r.kind, r.shape, r.rows) for r in results} == {(*kind, rows) for kind in kinds for rows in (1, 4)}
    assert all(r.best_us <= r.unfused_us for r in results)
    down = model.layers[0].ffn.down_proj.weight
    h = torch.randn(4, 2 * down.shape[1], dtype=torch.bfloat16, device="cuda")
    product = silu_and_mul(h)
    ref = F.linear(product.float(), down.float())
    for out in (kernels.linear(product, down, None), kernels.silu_mul_linear(h, down, None)):
        assert float((out.float() - ref).abs().max()) <= ref.abs().max() / 64


def test_tuning_refuses_a_configuration_whose_values_differ():
    ref = [torch.randn(4, 64).to(torch.bfloat16), torch.randn(4, 64)]
    close = [ref[0] * (1 + 2 ** -8), ref[1] + 1e-6]  # one bfloat16 step; float32 rounding
    assert plan._agrees(ref, close)
    wrong_row = close[0].clone()
    wrong_row[2] = 0
    assert not plan._agrees(ref, [wrong_row, close[1]])
    assert not plan._agrees([ref[1]], [ref[1] * 1.01])  # float32 is held to 1e-4
