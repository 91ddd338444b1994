"""Grammar compilation for constrained decoding: llguidance's tokenizer, a small worker pool, a cache.

Compiling turns a StructuredOutput into an llguidance matcher in its start state (the template); each
sequence then runs its own copy (deep_copy is ~1 us). Compiling never runs on the engine's step thread:
`compile` returns a Future at once and the work happens on the pool (llguidance drops the GIL while it
builds a grammar). The cache keys on the constraint's kind and text, holds failures as well as
successes, and keeps the most recently used entries, so a repeated schema costs nothing.

Measured on SmolLM2's 49k vocabulary (2-core EPYC): a small schema compiles in ~0.6 ms, a schema with 200
patterned properties in ~10 ms; llguidance's own validation costs ~70% of a compile, so there is no cheaper
synchronous check than the compile itself.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import llguidance

from model.tokenizer import TextTokenizer
from service.engine.errors import RequestRejected
from service.engine.structured.masking import GrammarState
from service.engine.structured.spec import StructuredOutput

log = logging.getLogger("kvserve.engine")

# Compact JSON with a space after separators: a small model given free whitespace can emit newlines
# until max_tokens. A schema's own "x-guidance" options override these.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_NOUNS = {"json": "JSON schema", "regex": "regex", "choice": "choice list", "grammar": "grammar"}

# on_compiled(kind, seconds, error or None), called on the worker thread after each compile (not hits).
CompileListener = Callable[[str, float, "str | None"], None]


@dataclass(frozen=True)
class CompiledGrammar:
    kind: str
    template: llguidance.LLMatcher | None  # the start state; None if the compile failed
    error: str | None  # llguidance's reason, when it refused the constraint
    seconds: float
    vocab_size: int  # of llguidance's tokenizer: the width of its masks

    def check(self, spec: StructuredOutput) -> None:
        """Raise RequestRejected naming spec's field if this constraint did not compile."""
        if self.error is not None:
            raise RequestRejected(f"{spec.field}: invalid {_NOUNS[self.kind]}: {self.error}", spec.field)

    def new_state(self) -> GrammarState:
        """A sequence's own matcher, at the start of the grammar."""
        return GrammarState(self.template.deep_copy(), self.vocab_size)


def llguidance_tokenizer(tokenizer: TextTokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of kvserve's tokenizer: the same per-token bytes the detokenizer uses, so the two
    never disagree about what a token spells. vocab_size (the model's, maybe padded) sizes the masks."""
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TokenizerView(tokenizer)),
                                  n_vocab=max(vocab_size, tokenizer.vocab_size))


class _TokenizerView:
    """The attributes and call llguidance.TokenizerWrapper reads."""

    def __init__(self, tokenizer: TextTokenizer):
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self.special_token_ids = sorted(tokenizer.special_ids.values())
        self._encode = tokenizer.encode

    def __call__(self, text: str) -> list[int]:
        return self._encode(text)


def grammar_text(spec: StructuredOutput) -> str:
    """The constraint as llguidance's grammar definition (this does not check it)."""
    if spec.kind == "json":
        return llguidance.LLMatcher.grammar_from_json_schema(spec.source, defaults=JSON_OPTIONS)
    if spec.kind == "regex":
        # \d means [0-9], as in JSON schema patterns: the regex crate's Unicode digits let a small model
        # answer a phone-number pattern in segmented digits. regex_to_lark also escapes "/" for /.../.
        return llguidance.LLMatcher.grammar_from_lark(f"start: /{llguidance.regex_to_lark(spec.regex, 'd')}/")
    if spec.kind == "choice":
        # Lark string literals take JSON's escapes; non-ASCII is left as is.
        alternatives = " | ".join(json.dumps(choice, ensure_ascii=False) for choice in spec.choice)
        return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}")
    return llguidance.LLMatcher.grammar_from_lark(spec.grammar)


class GrammarCompiler:
    """One per engine: compiles on `workers` threads, caches up to `cache_size` constraints."""

    def __init__(self, tokenizer: TextTokenizer, vocab_size: int, workers: int = 2, cache_size: int = 512,
                 listeners: list[CompileListener] | None = None):
        self._tokenizer, self._vocab_size = tokenizer, vocab_size
        # Built by the first compile (~0.15 s, on a worker), not at start: it holds ~21 MB (SmolLM2's 49k
        # tokens) that a server never asked for a constraint does not need.
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="kvserve-grammar")
        self._cache: OrderedDict[tuple[str, str], Future[CompiledGrammar]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()  # the cache, taken by callers' threads and the engine's
        self._tokenizer_lock = threading.Lock()  # the first compiles build the tokenizer once; callers never wait on it
        self.listeners = listeners if listeners is not None else []

    def compile(self, spec: StructuredOutput) -> Future[CompiledGrammar]:
        """The constraint's compiled grammar: a cached Future (maybe already done) or a new compile."""
        key = (spec.kind, spec.source)
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = self._cache[key] = self._pool.submit(self._compile, spec)
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return future

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _compile(self, spec: StructuredOutput) -> CompiledGrammar:
        tokenizer = self.ll_tokenizer()
        start = time.perf_counter()
        try:
            matcher = llguidance.LLMatcher(tokenizer, grammar_text(spec), log_level=0)
            error = matcher.get_error() if matcher.is_error() else None
        except ValueError as exc:  # a schema llguidance cannot even read
            matcher, error = None, str(exc)
        seconds = time.perf_counter() - start
        if error is not None:
            log.info("%s refused by llguidance: %s", spec.kind, error)
        for listener in self.listeners:
            listener(spec.kind, seconds, error)
        return CompiledGrammar(spec.kind, None if error else matcher, error, seconds, tokenizer.vocab_size)

    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._tokenizer_lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance_tokenizer(self._tokenizer, self._vocab_size)
            return self._ll_tokenizer
