"""Server settings from KVSERVE_* environment variables and command-line flags (flags win)."""
from __future__ import annotations

import argparse
import dataclasses
import re
import typing

from pydantic import Field, create_model, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.engine.config import EngineConfig, default_kv_cache_memory

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


class ServerSettings(BaseSettings):
    """The settings of the server itself; Settings adds the engine's (from EngineConfig) to these."""
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
    api_key: list[str] = Field(default_factory=list, description="accepted bearer keys (repeatable)")
    protect_health_and_metrics: bool = Field(False, description="require the API key on /health and /metrics too")
    cors_origins: list[str] = Field(default_factory=list)
    request_timeout: float = Field(600.0, gt=0, description="seconds before a request is aborted")
    drain_timeout: float = Field(30.0, ge=0, description="seconds in-flight requests get after SIGTERM")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: one per core)")
    enable_metrics: bool = Field(True, description="record request and step metrics for /metrics")
    log_level: str = "info"

    # kv_cache_memory is one of the engine's fields, added by Settings below.
    @field_validator("kv_cache_memory", mode="before", check_fields=False)
    @classmethod
    def _size_in_bytes(cls, value: str | int | None) -> int | None:
        return None if value is None else parse_bytes(value)

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
        values = {name: getattr(self, name) for name in _ENGINE_SETTINGS}
        if values["kv_cache_memory"] is None:
            values["kv_cache_memory"] = default_kv_cache_memory(self.resolved_device())
        return EngineConfig(**values)


def _engine_settings() -> dict[str, tuple]:
    """A pydantic field for each EngineConfig knob marked as a setting, with its type, default, bounds and
    help text. Unset, the server's KV cache size follows the device (default_kv_cache_memory), so its
    default here is None rather than EngineConfig's CPU size."""
    types = typing.get_type_hints(EngineConfig)
    fields = {}
    for knob in dataclasses.fields(EngineConfig):
        if "setting" in knob.metadata:
            default = None if knob.name == "kv_cache_memory" else knob.default
            fields[knob.name] = (types[knob.name], Field(default, **knob.metadata["setting"]))
    return fields


_ENGINE_SETTINGS = _engine_settings()
Settings = create_model("Settings", __base__=ServerSettings, __module__=__name__,
                        __doc__="Every server setting: the server's own and the engine's.", **_ENGINE_SETTINGS)


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
