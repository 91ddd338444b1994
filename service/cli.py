"""The `kvserve` command: serve; generate (from a server, or in this process with --local); chat; bench."""
from __future__ import annotations

import argparse
import os
import sys

from clients.cli import add_bench_arguments, add_chat_arguments, add_connection_arguments, add_sampling_arguments
from service.settings import BadSetting, Settings, add_settings_arguments, flag_name, help_text, settings_from_args


def _serve(args: argparse.Namespace) -> None:
    try:
        settings = settings_from_args(args)
    except BadSetting as exc:
        sys.stderr.write(f"kvserve serve: {exc}\n")
        sys.exit(2)  # argparse's status for a usage error
    from service.server import serve

    serve(settings)


def _generate(args: argparse.Namespace) -> None:
    if args.local:
        if args.url is not None:
            args.parser.error("--url asks a server, --local runs the model here: give one of them")
        from service.generate_local import generate_local

        return generate_local(args)
    loading_flags = [flag_name(name) for name in ("dtype", "quantization", "device") if getattr(args, name)]
    if loading_flags:  # refused rather than ignored: they would not change what the server runs
        args.parser.error(f"{', '.join(loading_flags)}: only with --local (a server loads its own model)")
    from clients.cli import generate_remote

    generate_remote(args)


def _chat(args: argparse.Namespace) -> None:
    from clients.cli import chat

    chat(args)


def _bench(args: argparse.Namespace) -> None:
    from clients.cli import bench

    bench(args)


def _setting_help(name: str) -> str:
    """The server's own help text for one of its settings, default and variable included."""
    return help_text(name, Settings.model_fields[name])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvserve", description="A small LLM inference server.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the model over HTTP",
                                description="Serve the model over HTTP. Every flag can also be set by the "
                                            "environment variable in brackets; a flag wins over its variable.")
    add_settings_arguments(serve)
    serve.set_defaults(run=_serve)
    gen = commands.add_parser("generate", help="generate one completion from a server (or here, with --local)",
                              description="Generate one completion from a kvserve server (--url, else "
                                          "$KVSERVE_URL, else http://127.0.0.1:8000) or, with --local, from "
                                          "the model loaded in this process as `kvserve serve` would load it.")
    gen.add_argument("prompt")
    add_connection_arguments(gen)
    gen.add_argument("--local", action="store_true",
                     help="run the model in this process instead of asking a server: loaded as `kvserve serve` "
                          "loads it, with its defaults and KVSERVE_* variables (the same dtype and quantization)")
    gen.add_argument("--model", default=None, help="from a server: the model name to ask for (default: the "
                                                   "server's); with --local: " + _setting_help("model"))
    for name in ("dtype", "quantization", "device"):
        gen.add_argument(flag_name(name), default=None, help="with --local: " + _setting_help(name))
    gen.add_argument("--chat", action="store_true", help="a chat message (chat template), not raw text")
    gen.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    add_sampling_arguments(gen)
    gen.set_defaults(run=_generate, parser=gen)
    chat = commands.add_parser("chat", help="chat with a server interactively (streams, keeps the history)")
    add_chat_arguments(chat)
    chat.set_defaults(run=_chat)
    bench = commands.add_parser("bench", help="benchmark any OpenAI-compatible server (JSON + PNG report)")
    add_bench_arguments(bench)
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    # Before torch loads OpenMP: worker threads spin only briefly (~10k iterations) between ops, then
    # sleep. libgomp's default spins for long stretches, and a decode step on a busy 2-core machine took
    # 5-40x longer; sleeping at once (OMP_WAIT_POLICY=PASSIVE) costs a wake-up per op, 1.8x slower
    # single-stream when the machine is free (bench/results/cpu_fast_path.md). Set either variable
    # yourself to override: PASSIVE is the safer choice on a host shared with other busy processes.
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = "10000"
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
