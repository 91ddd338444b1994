"""The client side of the `kvserve` command: `generate`, `chat` and `bench` (wired in service/cli.py)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from clients.client import Client
from clients.errors import APIConnectionError, KvserveError


def add_connection_arguments(parser: argparse.ArgumentParser, url_help: str | None = None) -> None:
    parser.add_argument("--url", default=None,
                        help=url_help or "server URL (default: $KVSERVE_URL, else http://127.0.0.1:8000)")
    parser.add_argument("--api-key", default=None, help="bearer API key (default: $KVSERVE_API_KEY)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds to wait for each read (default: %(default)s)")


def add_sampling_arguments(parser: argparse.ArgumentParser, temperature: float = 0.0,
                           max_tokens: int = 64) -> None:
    parser.add_argument("--temperature", type=float, default=temperature,
                        help="sampling temperature; 0 is greedy (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=max_tokens,
                        help="most tokens to generate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None, help="seed of this request's sampling")


def _sampling(args: argparse.Namespace) -> dict:
    params = {"temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens}
    return params if args.seed is None else dict(params, seed=args.seed)


def _client(args: argparse.Namespace) -> Client:
    return Client(args.url, args.api_key, model=getattr(args, "model", None), timeout=args.timeout)


START_A_SERVER = "start one with `kvserve serve` or point --url or KVSERVE_URL at one"


def fail(error: KvserveError, url: str | None = None, remedy: str = START_A_SERVER) -> None:
    """One line on stderr, then exit status 1. A connection that was never made (the only kind the client
    retries) means no server listens at `url`: say so, and what to do, rather than httpx's words."""
    if url is not None and isinstance(error, APIConnectionError) and error.retryable:
        sys.stderr.write(f"error: no kvserve server answers at {url} ({error.message}); {remedy}\n")
    else:
        sys.stderr.write(f"error: {error}\n")
    raise SystemExit(1)


class Meter:
    """Time to first token and tokens per second of one streamed reply."""

    def __init__(self) -> None:
        self.start, self.first = time.perf_counter(), None
        self.chunks, self.usage, self.finish_reason = 0, None, None

    def add(self, chunk) -> str:
        if chunk.usage is not None:
            self.usage = chunk.usage
        if chunk.choices and chunk.choices[0].finish_reason:
            self.finish_reason = chunk.choices[0].finish_reason
        if chunk.text:
            self.chunks += 1
            self.first = self.first or time.perf_counter()
        return chunk.text

    def report(self) -> str:
        tokens = self.usage.completion_tokens if self.usage else self.chunks
        parts = [f"{tokens} tokens"] + ([f"prompt {self.usage.prompt_tokens} tokens"] if self.usage else [])
        parts.append(f"finish_reason={self.finish_reason}")
        if self.first is not None:
            decode = time.perf_counter() - self.first
            parts.append(f"TTFT {1000 * (self.first - self.start):.0f} ms")
            if tokens > 1 and decode > 0:
                parts.append(f"{(tokens - 1) / decode:.1f} tok/s")
        return "[" + ", ".join(parts) + "]"


def generate_remote(args: argparse.Namespace) -> None:
    """One completion from a server: /v1/chat/completions with --chat, else /v1/completions."""
    client = _client(args)
    try:
        with client:
            (_print_streamed if args.stream else _print_whole)(client, args)
    except KvserveError as exc:
        fail(exc, client.options.base_url, "start one with `kvserve serve`, point --url or KVSERVE_URL at one, "
                                            "or add --local to run the model in this process")


def _print_streamed(client: Client, args: argparse.Namespace) -> None:
    meter = Meter()
    messages = [{"role": "user", "content": args.prompt}]
    stream = client.chat_stream(messages, **_sampling(args)) if args.chat else \
        client.complete_stream(args.prompt, **_sampling(args))
    with stream:
        for chunk in stream:
            sys.stdout.write(meter.add(chunk))
            sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stderr.write(meter.report() + "\n")


def _print_whole(client: Client, args: argparse.Namespace) -> None:
    messages = [{"role": "user", "content": args.prompt}]
    result = client.chat(messages, **_sampling(args)) if args.chat else \
        client.complete(args.prompt, **_sampling(args))
    sys.stdout.write(result.text + "\n")
    tokens = result.usage.completion_tokens if result.usage else "?"
    sys.stderr.write(f"[{tokens} tokens, finish_reason={result.choices[0].finish_reason}]\n")


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)
    parser.add_argument("--model", default=None, help="model name to ask for (default: the server's)")
    parser.add_argument("--system", default=None, help="system prompt")
    add_sampling_arguments(parser, temperature=0.7, max_tokens=512)


def chat(args: argparse.Namespace) -> None:
    """Read a message per line, stream each reply, keep the history. /reset forgets it; /exit or
    end of input quits; Ctrl-C during a reply stops it (the server aborts the generation)."""
    interactive = sys.stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    client = _client(args)
    try:
        with client:
            if interactive:
                sys.stderr.write(f"kvserve chat at {client.options.base_url}: /reset clears the history, /exit "
                                 "or Ctrl-D quits, Ctrl-C stops a reply.\n")
            while (line := _read(interactive)) is not None:
                if line in ("/exit", "/quit"):
                    break
                if line == "/reset":
                    history = list(system)
                    continue
                if line:
                    history.append({"role": "user", "content": line})
                    history.append({"role": "assistant", "content": _reply(client, history, args, interactive)})
    except KvserveError as exc:
        fail(exc, client.options.base_url)


def _read(interactive: bool) -> str | None:
    try:
        return input("you> " if interactive else "").strip()
    except (EOFError, KeyboardInterrupt):
        return None


def _reply(client: Client, history: list[dict], args: argparse.Namespace, interactive: bool) -> str:
    meter, parts = Meter(), []
    if interactive:
        sys.stdout.write("assistant> ")
    stream = client.chat_stream(history, **_sampling(args))
    try:
        for chunk in stream:
            parts.append(meter.add(chunk))
            sys.stdout.write(parts[-1])
            sys.stdout.flush()
    except KeyboardInterrupt:
        meter.finish_reason = "stopped"
    finally:
        stream.close()
    sys.stdout.write("\n")
    sys.stdout.flush()
    sys.stderr.write(meter.report() + "\n")
    return "".join(parts)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser, "URL of any OpenAI-compatible server (default: $KVSERVE_URL, else "
                                     "http://127.0.0.1:8000)")
    parser.add_argument("--model", default=None, help="model name to ask for (default: the server's first)")
    parser.add_argument("--num-prompts", type=int, default=32, help="requests per load level")
    parser.add_argument("--input-len", default="128", help="prompt tokens: N, or LOW-HIGH drawn uniformly")
    parser.add_argument("--output-len", default="64-128", help="max_tokens: N, or LOW-HIGH drawn uniformly")
    parser.add_argument("--shared-prefix", type=int, default=0,
                        help="tokens at the start of every prompt that all prompts share (0: all distinct)")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="requests in flight (default 8; with --request-rate: no limit unless given)")
    parser.add_argument("--request-rate", type=float, default=None, help="requests/s, Poisson arrivals")
    parser.add_argument("--sweep", default=None, help="comma-separated concurrencies, e.g. 1,4,16,64")
    parser.add_argument("--ignore-eos", action="store_true", help="generate exactly max_tokens tokens")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                        help="latency targets for goodput, e.g. ttft:2000 tpot:200 e2e:30000")
    parser.add_argument("--extra-body", default=None, help="JSON merged into every request body")
    parser.add_argument("--warmup", type=int, default=1, help="untimed short requests sent first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON path; PNGs go beside it (default bench/results/bench-TIMESTAMP.json)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def bench(args: argparse.Namespace) -> None:
    from clients.bench.bench import BenchConfig, run_benchmark
    from clients.bench.prompts import parse_range
    from clients.bench.runner import LoadSpec
    from clients.bench.stats import parse_goodput

    try:
        concurrency = args.concurrency if args.request_rate else (args.concurrency or 8)
        load = LoadSpec(concurrency, args.request_rate, args.temperature, args.ignore_eos,
                        json.loads(args.extra_body) if args.extra_body else {}, args.seed)
        output = args.output or Path(f"bench/results/bench-{time.strftime('%Y%m%d-%H%M%S')}.json")
        config = BenchConfig(args.url, args.api_key, args.model, args.num_prompts, parse_range(args.input_len),
                             parse_range(args.output_len), args.shared_prefix, load,
                             [int(c) for c in args.sweep.split(",")] if args.sweep else [],
                             parse_goodput(args.goodput), args.warmup, args.timeout, output, not args.no_progress)
    except ValueError as exc:
        sys.stderr.write(f"error: {exc}\n")
        raise SystemExit(2) from exc
    try:
        run_benchmark(config)
    except KvserveError as exc:
        fail(exc)
