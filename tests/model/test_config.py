"""ModelConfig: presets construct and keep their architecture, bad values fail naming the field,
and num_parameters counts exactly the tensors a checkpoint of that shape holds."""
from __future__ import annotations

import math

import pytest

from model.config import PRESETS, ModelConfig, preset, tiny
from model.loading import build_model
from model.loading.weights import expected_shapes, random_weights

ARCHITECTURE = ("activation", "norm", "norm_placement", "positional_encoding", "attention_bias",
                "mlp_bias", "tie_embeddings")


def valid(**overrides) -> dict:
    fields = dict(vocab_size=100, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  ffn_hidden_size=128)
    fields.update(overrides)
    return fields


@pytest.mark.parametrize("name", PRESETS)
def test_preset_constructs_and_validates(name):
    config = preset(name)
    config.validate()
    assert config.name == name
    assert config.head_dim * config.num_heads == config.hidden_size  # true of every preset's model
    assert config.num_heads % config.num_kv_heads == 0


@pytest.mark.parametrize("name", PRESETS)
def test_tiny_keeps_the_architecture_of_its_preset(name):
    full, small = preset(name), tiny(name)
    assert {f: getattr(small, f) for f in ARCHITECTURE} == {f: getattr(full, f) for f in ARCHITECTURE}
    # GQA stays GQA and MHA stays MHA; a window shrinks so short test sequences cross it.
    assert (small.num_kv_heads < small.num_heads) == (full.num_kv_heads < full.num_heads)
    assert (small.sliding_window is None) == (full.sliding_window is None)
    assert small.sliding_window in (None, 8)
    assert small.num_parameters() < 200_000


def test_preset_overrides_and_replace_return_changed_copies():
    config = preset("gpt2", num_layers=3)
    assert config.num_layers == 3 and PRESETS["gpt2"].num_layers == 12
    assert config.replace(num_layers=4).num_layers == 4 and config.num_layers == 3


def test_head_dim_defaults_to_hidden_over_heads_and_can_be_set():
    assert ModelConfig(**valid()).head_dim == 16
    assert ModelConfig(**valid(head_dim=32)).head_dim == 32
    assert ModelConfig(**valid()).num_queries_per_kv == 2


@pytest.mark.parametrize("overrides, field", [
    (dict(num_heads=6, num_kv_heads=4), "num_heads"),
    (dict(activation="swish"), "activation"),
    (dict(norm="batchnorm"), "norm"),
    (dict(norm_placement="sandwich"), "norm_placement"),
    (dict(positional_encoding="alibi"), "positional_encoding"),
    (dict(head_dim=15), "head_dim"),  # RoPE rotates channel pairs
    (dict(vocab_size=0), "vocab_size"),
    (dict(num_layers=-1), "num_layers"),
    (dict(num_kv_heads=0), "num_kv_heads"),
    (dict(max_position=0), "max_position"),
    (dict(sliding_window=0), "sliding_window"),
])
def test_bad_value_raises_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}\b"):
        ModelConfig(**valid(**overrides))


def test_odd_head_dim_is_fine_without_rope():
    config = ModelConfig(**valid(head_dim=15, positional_encoding="learned"))
    assert config.head_dim == 15


def test_replace_validates_too():
    with pytest.raises(ValueError, match="num_kv_heads"):
        preset("smollm2-135m").replace(num_kv_heads=4)  # 9 heads cannot share 4 KV heads


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="'nope'") as info:
        preset("nope")
    for name in PRESETS:
        assert name in str(info.value)


def test_smollm2_parameter_count():
    # From the shapes (d=576, 30 layers, 9 query / 3 KV heads of 64, ffn 1536, vocab 49152, tied):
    #   per layer: q,k,v 576*960 + o 576*576 + gate,up 2*576*1536 + down 1536*576 + 2 norms 2*576
    #            = 552,960 + 331,776 + 1,769,472 + 884,736 + 1,152 = 3,540,096
    #   30 layers 106,202,880 + embedding 49152*576 = 28,311,552 + final norm 576
    # = 134,515,008, the count Hugging Face reports for SmolLM2-135M.
    assert preset("smollm2-135m").num_parameters() == 134_515_008


def test_gpt2_parameter_count():
    # 124,439,808 is the published count for GPT-2 small (biases, LayerNorms and wpe included).
    assert preset("gpt2").num_parameters() == 124_439_808


@pytest.mark.parametrize("name", PRESETS)
def test_num_parameters_counts_every_tensor_a_checkpoint_holds(name):
    config = preset(name)
    assert config.num_parameters() == sum(math.prod(s) for s in expected_shapes(config).values())


@pytest.mark.parametrize("name", PRESETS)
def test_num_parameters_matches_the_built_model(name):
    # nn.Module.parameters() yields a tied head once, so this also checks the tie survives loading.
    config = tiny(name)
    model = build_model(config, random_weights(config), "random")
    assert sum(p.numel() for p in model.parameters()) == config.num_parameters()
