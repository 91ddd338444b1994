"""Server settings from KVSERVE_* environment variables and command-line flags (flags win)."""
from __future__ import annotations

import argparse
import re
import typing

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.engine.config import EngineConfig

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3}


def parse_bytes(value: str | int) -> int:
    """'512MiB', '2GiB', '1.5GB' or a plain number of bytes."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {value!r} (use e.g. 512MiB, 2GiB or a number of bytes)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KVSERVE_", protected_namespaces=())

    model: str = Field("smollm2", description="smollm2, a .gguf file, a Hugging Face folder or random:PRESET")
    served_model_name: str = Field("smollm2", description="the model name clients must send")
    dtype: str = Field("auto", description="auto (bfloat16; float32 on CPU without quantization), float32, "
                       "bfloat16, float16")
    quantization: str = Field("auto", description="auto (int4 on CPU, none on GPU), int4 (4-bit weight-only "
                              "projections, CPU only), none")
    device: str = Field("auto", description="auto, cpu or cuda[:N]")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    block_size: int = Field(16, ge=1, le=256)
    kv_cache_memory: str | None = Field(None, description="KV cache size, e.g. 2GiB (default: 1GiB on CPU, "
                                        "a fraction of free memory on GPU)")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(512, ge=1)
    max_queue: int = Field(256, ge=0, description="waiting requests beyond this get 503")
    max_model_len: int | None = Field(None, ge=1)
    enable_prefix_caching: bool = True
    cuda_graphs: bool = Field(True, description="replay GPU decode steps from CUDA graphs (--no-cuda-graphs: eager)")
    api_key: list[str] = Field(default_factory=list, description="accepted bearer keys (repeatable)")
    protect_health_and_metrics: bool = Field(False, description="require the API key on /health and /metrics too")
    cors_origins: list[str] = Field(default_factory=list)
    request_timeout: float = Field(600.0, gt=0, description="seconds before a request is aborted")
    drain_timeout: float = Field(30.0, ge=0, description="seconds in-flight requests get after SIGTERM")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: one per core)")
    enable_metrics: bool = Field(True, description="record request and step metrics for /metrics")
    seed: int = 0
    log_level: str = "info"

    @field_validator("kv_cache_memory")
    @classmethod
    def _valid_size(cls, value: str | None) -> str | None:
        if value is not None:
            parse_bytes(value)
        return value

    @field_validator("quantization")
    @classmethod
    def _valid_quantization(cls, value: str) -> str:
        if value not in ("auto", "int4", "none"):
            raise ValueError("quantization must be auto, int4 or none")
        return value

    @field_validator("dtype")
    @classmethod
    def _valid_dtype(cls, value: str) -> str:
        if value not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError("dtype must be auto, float32, bfloat16 or float16")
        return value

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_quantization(self) -> str | None:
        if self.quantization == "auto":
            return None if self.resolved_device().startswith("cuda") else "int4"
        return None if self.quantization == "none" else self.quantization

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        if self.resolved_device().startswith("cuda") or self.resolved_quantization():
            return "bfloat16"
        return "float32"

    def engine_config(self) -> EngineConfig:
        cpu = not self.resolved_device().startswith("cuda")
        memory = parse_bytes(self.kv_cache_memory) if self.kv_cache_memory else (1 << 30 if cpu else None)
        return EngineConfig(block_size=self.block_size, kv_cache_memory=memory,
                            gpu_memory_utilization=self.gpu_memory_utilization, max_num_seqs=self.max_num_seqs,
                            max_num_batched_tokens=self.max_num_batched_tokens, max_model_len=self.max_model_len,
                            max_queue=self.max_queue, enable_prefix_caching=self.enable_prefix_caching,
                            cuda_graphs=self.cuda_graphs, seed=self.seed)


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One --kebab-case flag per setting; lists repeat (--api-key a --api-key b), booleans pair
    with --no-..., and unset flags fall through to KVSERVE_* variables and defaults."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kind = typing.get_origin(field.annotation)
        help_text = field.description or ""
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif kind is list:
            parser.add_argument(flag, action="append", default=None, help=help_text)
        else:
            parser.add_argument(flag, default=None, help=help_text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    given = {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None}
    return Settings(**given)
