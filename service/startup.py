"""Start-up: load the model and build the engine before the port is bound, and say what was loaded.

A load that fails ends the process at once with one line naming the cause (exit status 1), so a
container restarts and an alert fires, instead of a server that binds its port and answers 503 forever.
"""
from __future__ import annotations

import logging
import time

from model.loading import LoadError
from service.engine.engine import Engine
from service.engine.status import EngineInfo
from service.settings import Settings

log = logging.getLogger("kvserve.startup")


class StartupFailed(Exception):
    """The model or the engine could not be set up; the message is the one line to print."""


def build_engine(settings: Settings) -> Engine:
    """Load the model as the settings say and build its engine (not started). Raises StartupFailed."""
    import torch

    from model.loading import load_model

    if settings.threads:
        torch.set_num_threads(settings.threads)
    dtype, device, quantization = settings.resolved_dtype(), settings.resolved_device(), settings.resolved_quantization()
    log.info("loading model %s (dtype %s, quantization %s, device %s, %d threads)", settings.model, dtype,
             quantization or "none", device, torch.get_num_threads())
    start = time.perf_counter()
    try:
        loaded = load_model(settings.model, dtype, device, quantization)
        log.info("building the engine: KV cache, batch shapes%s ...",
                 ", CUDA graphs" if device.startswith("cuda") and settings.cuda_graphs else "")
        engine = Engine(loaded, settings.engine_config())
    except (LoadError, OSError, ValueError, RuntimeError) as exc:
        log.debug("start-up failed", exc_info=True)
        raise StartupFailed(f"cannot load the model: {one_line(exc)}") from exc
    log.info("model loaded in %.1f s", time.perf_counter() - start)
    return engine


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, LoadError) else f"{type(exc).__name__}: {text}"


def ready_line(info: EngineInfo, url: str, served_name: str, max_num_seqs: int) -> str:
    from model.loading.loader import human_count

    quantization = f", {info.quantization}" if info.quantization else ""
    return (f"kvserve ready on {url}: model {served_name!r} ({info.name}, {info.architecture}, "
            f"{human_count(info.num_parameters)} parameters, {info.dtype}{quantization}, {info.device}), "
            f"context {info.max_model_len} tokens, KV cache {info.kv_cache_tokens} tokens "
            f"({info.kv_cache_blocks} blocks of {info.block_size}, {info.kv_cache_dtype}), up to {max_num_seqs} "
            "sequences at once")
