"""Server settings from KVSERVE_* environment variables and command-line flags (flags win)."""
from __future__ import annotations

import argparse
import dataclasses
import re
import typing

from pydantic import Field, ValidationError, create_model, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

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


def server_setting(default, description: str, group: str, **bounds):
    """A field of the server's own settings; `group` is its section in `kvserve serve --help`."""
    factory = {"default_factory": default} if callable(default) else {"default": default}
    return Field(**factory, description=description, json_schema_extra={"group": group}, **bounds)


class ServerSettings(BaseSettings):
    """The settings of the server itself; Settings adds the engine's (from EngineConfig) to these."""
    model_config = SettingsConfigDict(env_prefix="KVSERVE_", protected_namespaces=())

    model: str = server_setting("smollm2", "smollm2, a .gguf file, a Hugging Face folder or random:PRESET", "model")
    served_model_name: str = server_setting("smollm2", "the model name the API reports and accepts", "model")
    dtype: str = server_setting("auto", "auto (bfloat16 on a GPU, float32 on CPU), float32, bfloat16 or float16",
                                "model")
    quantization: str = server_setting("auto", "auto (int4 on CPU, none on GPU), int4 (4-bit weight-only "
                                       "projections, CPU only) or none", "model")
    device: str = server_setting("auto", "auto (cuda if available), cpu or cuda[:N]", "model")
    host: str = server_setting("127.0.0.1", "address to listen on (0.0.0.0: every interface)", "server")
    port: int = server_setting(8000, "TCP port to listen on", "server", ge=0, le=65535)
    request_timeout: float = server_setting(600.0, "seconds before a request is aborted", "server", gt=0)
    drain_timeout: float = server_setting(30.0, "seconds in-flight requests get to finish after SIGTERM", "server",
                                          ge=0)
    max_body_bytes: int = server_setting(4 * 1024 * 1024, "largest request body accepted, in bytes", "server",
                                         ge=1024)
    enable_metrics: bool = server_setting(True, "record request and step metrics for /metrics", "server")
    log_level: str = server_setting("info", "debug, info, warning or error", "server")
    log_format: str = server_setting("text", "text (lines for people) or json (one object per line)", "server")
    request_log: bool = server_setting(True, "log one line per finished request (--no-request-log: off)",
                                       "server")
    stats_interval: float = server_setting(10.0, "seconds between engine stats lines while busy (0: off)",
                                           "server", ge=0)
    api_key: list[str] = server_setting(list, "accepted bearer keys (repeat the flag for several; "
                                        "KVSERVE_API_KEY takes a JSON list); none: no authentication", "security")
    protect_health_and_metrics: bool = server_setting(False, "require the API key on /health and /metrics too",
                                                      "security")
    cors_origins: list[str] = server_setting(list, "origins allowed to call the API from a browser (repeatable)",
                                             "security")
    threads: int | None = server_setting(None, "torch intra-op threads (default: one per core)", "engine", ge=1)

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

    @field_validator("log_level")
    @classmethod
    def _valid_log_level(cls, value: str) -> str:
        if value.lower() not in ("debug", "info", "warning", "error", "critical"):
            raise ValueError("log_level must be debug, info, warning, error or critical")
        return value.lower()

    @field_validator("log_format")
    @classmethod
    def _valid_log_format(cls, value: str) -> str:
        if value not in ("text", "json"):
            raise ValueError("log_format must be text or json")
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
        # On CPU the int4 projections' kernel takes float32 activations as fast as bfloat16 ones, and a
        # float32 residual stream keeps SmolLM2's greedy output equal to the float32 reference's.
        return "bfloat16" if self.resolved_device().startswith("cuda") else "float32"

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


GROUPS = {"model": "model: what is served and how it is loaded",
          "engine": "engine: batching, KV cache and threads",
          "server": "server: HTTP, logs and metrics",
          "security": "security: authentication and browsers"}


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return "KVSERVE_" + name.upper()


def help_text(name: str, field) -> str:
    text = field.description or ""
    default = field.get_default(call_default_factory=True)
    if default not in (None, []):
        shown = ("on" if default else "off") if isinstance(default, bool) else default
        text += f" (default: {shown})"
    return f"{text} [{env_name(name)}]".replace("%", "%%")  # argparse %-formats help texts


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One --kebab-case flag per setting, in sections; lists repeat (--api-key a --api-key b), booleans
    pair with --no-..., and unset flags fall through to KVSERVE_* variables and defaults."""
    sections = {group: parser.add_argument_group(title) for group, title in GROUPS.items()}
    for name, field in Settings.model_fields.items():
        group = (field.json_schema_extra or {}).get("group", "engine")
        section, flag = sections[group], flag_name(name)
        if field.annotation is bool:
            section.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                 help=help_text(name, field))
        elif typing.get_origin(field.annotation) is list:
            section.add_argument(flag, action="append", default=None, help=help_text(name, field))
        else:
            section.add_argument(flag, default=None, help=help_text(name, field))


class BadSetting(Exception):
    """A setting's value was refused; the message is one line naming the flag, its variable and the value."""


def settings_from_args(args: argparse.Namespace) -> Settings:
    given = {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise BadSetting("; ".join(describe_error(error, given) for error in exc.errors())) from None
    except SettingsError as exc:  # a list variable that is not JSON: pydantic-settings parses those itself
        match = re.search(r'field "(\w+)"', str(exc))
        name = env_name(match.group(1)) if match else "a KVSERVE_ variable"
        raise BadSetting(f"invalid value for {name}: a list setting takes a JSON list, e.g. "
                         f"{name}='[\"first\", \"second\"]'") from None


def describe_error(error: dict, given: dict) -> str:
    name = str(error["loc"][0]) if error["loc"] else ""
    source = f"{flag_name(name)} (or {env_name(name)})" if name in given else f"{env_name(name)} (or {flag_name(name)})"
    reason = error["msg"].removeprefix("Value error, ")
    return f"invalid value {error.get('input')!r} for {source}: {reason}"
