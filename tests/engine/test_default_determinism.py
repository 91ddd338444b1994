"""The default CPU configuration (what `kvserve serve` loads: int4 codes on the native kernels, float32
activations) is deterministic: a request's tokens and logprobs are bitwise the same alone, repeated with its
prefix cached, with its prompt chunked differently, and batched with 64 other requests; seeded sampling too.
With SmolLM2 and with a tiny random model, on the default float16 KV cache; float32 and bfloat16 ones too."""
from __future__ import annotations

import pytest
import torch

from model.config import tiny
from model.loading import LoadedModel, build_model, load_model
from model.loading.weights import random_weights
from model.network.attention import kv_cache_bytes_per_block
from model.quantization.native_codes import NativeQuantizedLinear
from model.quantization.quantize import quantize_model
from service.engine.config import EngineConfig
from service.engine.engine import Engine
from service.engine.request import SamplingParams
from service.settings import Settings
from tests.engine.engine_helpers import BLOCK_SIZE, Collector, generate, greedy, make_engine, random_prompt
from tests.native_cpu import needs_native

MAX_TOKENS = 12
CROWD = 64
pytestmark = needs_native


@pytest.fixture(scope="module")
def default_smollm2() -> LoadedModel:
    settings = Settings(device="cpu")
    loaded = load_model(settings.model, settings.resolved_dtype(), "cpu", settings.resolved_quantization())
    assert isinstance(loaded.model.lm_head, NativeQuantizedLinear) and loaded.dtype == torch.float32
    return loaded


@pytest.fixture(scope="module")
def tiny_int4(smollm2_tokenizer) -> LoadedModel:
    config = tiny("smollm2-135m", vocab_size=49152, max_position=2048)
    model = quantize_model(build_model(config, random_weights(config, seed=5), "tiny"), "int4")
    return LoadedModel(model, config, smollm2_tokenizer, "tiny", torch.float32, torch.device("cpu"), 0.0, "int4")


def smollm2_prompts(tok) -> dict[str, list[int]]:
    def chat(text):
        return tok.encode(tok.render_chat([{"role": "user", "content": text}]))
    document = " ".join(f"Section {i}: the committee reviewed item {i * 7} and approved its budget." for i in range(40))
    return {"chat": chat("What is the capital of France?"),
            "code": chat("Write a Python function that reverses a linked list."),
            "chinese": chat("请用中文介绍一下长城。"),
            "long": chat(f"Summarize this report:\n{document}")}  # ~700 tokens: several 128-token chunks


def run(loaded, prompts, params, crowd: int = 0, **options) -> Collector:
    others = {f"other{i}": random_prompt(100 + i, 20 + i % 30) for i in range(crowd)}
    engine = make_engine(loaded, 1024, max_num_seqs=len(prompts) + crowd, **options)
    return generate(engine, {**prompts, **others}, params)


def assert_identical(expected: Collector, got: Collector, names) -> None:
    for name in names:
        assert got[name].token_ids == expected[name].token_ids, name
        assert got[name].logprobs == expected[name].logprobs, name  # bitwise: the same arithmetic


def check_every_arrangement(loaded, prompts, params) -> None:
    alone = {}
    for name, ids in prompts.items():
        engine = make_engine(loaded, 1024)
        first = generate(engine, {name: ids}, params)
        again = generate(engine, {name: ids}, params)  # its prompt's full blocks now come from the prefix cache
        if len(ids) >= 32:
            assert again[name].last.num_cached_tokens > 0, name
        assert_identical(first, again, [name])
        alone.update(first.results)
    alone = _collected(alone)
    assert_identical(alone, run(loaded, prompts, params, max_num_batched_tokens=48), prompts)  # other chunks
    assert_identical(alone, run(loaded, prompts, params, crowd=CROWD), prompts)  # batched with 64 others


def _collected(results) -> Collector:
    collector = Collector()
    collector.results.update(results)
    return collector


@pytest.mark.slow
def test_smollm2_greedy_is_deterministic_on_the_default_path(default_smollm2):
    prompts = smollm2_prompts(default_smollm2.tokenizer)
    check_every_arrangement(default_smollm2, prompts, greedy(MAX_TOKENS, logprobs=0))


@pytest.mark.slow
def test_smollm2_seeded_sampling_is_deterministic_on_the_default_path(default_smollm2):
    prompts = smollm2_prompts(default_smollm2.tokenizer)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=MAX_TOKENS, logprobs=0)
    check_every_arrangement(default_smollm2, {k: prompts[k] for k in ("chat", "long")}, params)


@pytest.mark.parametrize("params", [greedy(16, logprobs=0),
                                    SamplingParams(temperature=1.0, seed=3, max_tokens=16, logprobs=0)],
                         ids=["greedy", "seeded"])
def test_tiny_int4_model_is_deterministic(tiny_int4, params):
    prompts = {f"p{i}": random_prompt(i, n) for i, n in enumerate([5, 40, 77, 130, 300])}
    check_every_arrangement(tiny_int4, prompts, params)


def test_the_kv_cache_dtypes_hold_their_share_of_tokens_and_stay_deterministic(tiny_int4):
    """The default (auto: float16 on a CPU) is covered by every test above; float32 and bfloat16 here."""
    memory = 64 * kv_cache_bytes_per_block(tiny_int4.config, BLOCK_SIZE, torch.float32)
    dtypes = {"auto": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
    engines = {name: Engine(tiny_int4, EngineConfig(block_size=BLOCK_SIZE, kv_cache_memory=memory,
                                                    kv_cache_dtype=name)) for name in dtypes}
    assert {name: e.core.blocks.num_blocks for name, e in engines.items()} == \
        {"auto": 128, "float32": 64, "bfloat16": 128}
    assert {name: e.core.runner.kv_caches[0][0].dtype for name, e in engines.items()} == dtypes
    prompts = {f"p{i}": random_prompt(i, n) for i, n in enumerate([9, 70, 200])}
    params = greedy(12, logprobs=0)
    for name in ("float32", "bfloat16"):
        alone = _collected({k: v for prompt, ids in prompts.items()
                            for k, v in generate(engines[name], {prompt: ids}, params).results.items()})
        assert_identical(alone, generate(engines[name], prompts, params), prompts)


@pytest.mark.slow
def test_the_thread_count_does_not_change_results(default_smollm2):
    """The ThreadTuner may switch between 2 threads and 1 mid-request: each output is computed on one thread."""
    prompts = smollm2_prompts(default_smollm2.tokenizer)
    params = greedy(MAX_TOKENS, logprobs=0)
    one = run(default_smollm2, prompts, params)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        engine = make_engine(default_smollm2, 1024, max_num_seqs=len(prompts))
        assert engine.core.threads.enabled
        engine.core.threads.interval = 1  # probe one thread at once, and often
        two = generate(engine, prompts, params)
    finally:
        torch.set_num_threads(before)
    assert_identical(one, two, prompts)
