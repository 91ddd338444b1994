"""The `kvserve` command: serve, and generate (offline, through the engine, for debugging)."""
from __future__ import annotations

import argparse
import sys

from service.settings import add_settings_arguments, settings_from_args


def _serve(args: argparse.Namespace) -> None:
    from service.server import serve

    serve(settings_from_args(args))


def _generate(args: argparse.Namespace) -> None:
    from service.engine import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, device=args.device, kv_cache_memory=256 << 20)
    prompt = llm.tokenizer.render_chat([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                            seed=args.seed)
    result = llm.generate([prompt], params)[0]
    sys.stdout.write(result.text + "\n")
    sys.stderr.write(f"[{len(result.token_ids)} tokens, finish_reason={result.finish_reason}]\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvserve", description="A small LLM inference server.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the model over HTTP")
    add_settings_arguments(serve)
    serve.set_defaults(run=_serve)
    gen = commands.add_parser("generate", help="generate a completion in-process (no server)")
    gen.add_argument("prompt")
    gen.add_argument("--model", default="smollm2")
    gen.add_argument("--dtype", default="float32")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(run=_generate)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
