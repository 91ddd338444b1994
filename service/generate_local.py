"""`kvserve generate --local`: one completion from the model loaded in this process, loaded exactly as
`kvserve serve` would load it (the same Settings, so the same auto dtype and quantization and the same
KVSERVE_* variables), so that --local answers as the server would on this machine."""
from __future__ import annotations

import argparse
import sys

from service.engine.errors import EngineOverloaded, RequestRejected
from service.engine.outputs import RequestOutput
from service.engine.request import SamplingParams
from service.logs import configure_logging
from service.settings import BadSetting, Settings, settings_from_args
from service.startup import StartupFailed, build_engine

# The flags of `generate` that are server settings. Only these: generate's --seed is the request's
# sampling seed, not the server's --seed.
MODEL_FLAGS = ("model", "dtype", "quantization", "device")


def local_settings(args: argparse.Namespace) -> Settings:
    """The server's settings with generate's model flags on top; raises BadSetting."""
    return settings_from_args(argparse.Namespace(**{name: getattr(args, name) for name in MODEL_FLAGS}))


def generate_local(args: argparse.Namespace) -> None:
    try:
        settings = local_settings(args)
    except BadSetting as exc:
        sys.stderr.write(f"kvserve generate: {exc}\n")
        raise SystemExit(2) from None  # argparse's status for a usage error, as `kvserve serve`
    configure_logging(settings.log_level, settings.log_format)  # the load's progress lines, on stderr
    try:
        engine = build_engine(settings)
    except StartupFailed as exc:
        sys.stderr.write(f"kvserve generate: {exc}\n")
        raise SystemExit(1) from None
    tokenizer = engine.tokenizer
    prompt = tokenizer.render_chat([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                            seed=args.seed)
    last = _run(engine, tokenizer.encode(prompt), params, args.stream)
    if last.error:
        sys.stderr.write(f"error: generation failed: {last.error}\n")
        raise SystemExit(1)
    sys.stderr.write(f"[{last.num_output_tokens} tokens, finish_reason={last.finish_reason}]\n")


def _run(engine, prompt_ids: list[int], params: SamplingParams, stream: bool) -> RequestOutput:
    """Step the engine in this thread until the request is done; print its text (as it comes when
    streaming) and return its last output."""
    outputs: list[RequestOutput] = []

    def show(out: RequestOutput) -> None:
        outputs.append(out)
        if stream:
            sys.stdout.write(out.new_text)
            sys.stdout.flush()

    try:
        engine.add_request(prompt_ids, params, "cli", show)
    except (RequestRejected, EngineOverloaded) as exc:
        sys.stderr.write(f"error: {exc}\n")
        raise SystemExit(1) from None
    while engine.has_unfinished():
        engine.step()
    sys.stdout.write(("" if stream else "".join(out.new_text for out in outputs)) + "\n")
    return outputs[-1]
