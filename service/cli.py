"""The `kvserve` command: serve; generate (from a server with --url, else in-process); chat; bench."""
from __future__ import annotations

import argparse
import os
import sys

from clients.cli import add_bench_arguments, add_chat_arguments, add_connection_arguments, add_sampling_arguments
from service.settings import BadSetting, add_settings_arguments, settings_from_args


def _serve(args: argparse.Namespace) -> None:
    try:
        settings = settings_from_args(args)
    except BadSetting as exc:
        sys.stderr.write(f"kvserve serve: {exc}\n")
        sys.exit(2)  # argparse's status for a usage error
    from service.server import serve

    serve(settings)


def _generate(args: argparse.Namespace) -> None:
    if args.url:
        from clients.cli import generate_remote

        return generate_remote(args)
    from service.engine import LLM, SamplingParams

    llm = LLM(args.model or "smollm2", dtype=args.dtype, device=args.device, kv_cache_memory=256 << 20)
    prompt = llm.tokenizer.render_chat([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                            seed=args.seed)
    if args.stream:
        return _generate_streamed(llm, prompt, params)
    result = llm.generate([prompt], params)[0]
    sys.stdout.write(result.text + "\n")
    sys.stderr.write(f"[{len(result.token_ids)} tokens, finish_reason={result.finish_reason}]\n")


def _generate_streamed(llm, prompt: str, params) -> None:
    finished = []

    def show(out) -> None:
        sys.stdout.write(out.new_text)
        sys.stdout.flush()
        if out.finished:
            finished.append(out)

    llm.engine.add_request(llm.tokenizer.encode(prompt), params, "cli", show)
    while llm.engine.has_unfinished():
        llm.engine.step()
    sys.stdout.write("\n")
    sys.stderr.write(f"[{finished[0].num_output_tokens} tokens, finish_reason={finished[0].finish_reason}]\n")


def _chat(args: argparse.Namespace) -> None:
    from clients.cli import chat

    chat(args)


def _bench(args: argparse.Namespace) -> None:
    from clients.cli import bench

    bench(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvserve", description="A small LLM inference server.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the model over HTTP",
                                description="Serve the model over HTTP. Every flag can also be set by the "
                                            "environment variable in brackets; a flag wins over its variable.")
    add_settings_arguments(serve)
    serve.set_defaults(run=_serve)
    gen = commands.add_parser("generate", help="generate one completion, from a server (--url) or in-process")
    gen.add_argument("prompt")
    add_connection_arguments(gen, "server URL; without it the model runs in this process")
    gen.add_argument("--model", default=None, help="in-process: smollm2, a .gguf file or a folder (default "
                                                   "smollm2); with --url: the model name (default: the server's)")
    gen.add_argument("--dtype", default="float32", help="in-process only")
    gen.add_argument("--device", default="cpu", help="in-process only")
    gen.add_argument("--chat", action="store_true", help="a chat message (chat template), not raw text")
    gen.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    add_sampling_arguments(gen)
    gen.set_defaults(run=_generate)
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
