"""Benchmark prompts of a chosen number of tokens, built from varied words so that no two share a
prefix (a prefix cache cannot flatter the result), or all sharing one prefix when that is the point.

Token counts come from the server's /tokenize and /detokenize when it has them (kvserve and vLLM
take {"prompt"}, llama.cpp's server {"content"}; both are sent), else from one word = one token.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from clients.client import AsyncClient
from clients.errors import KvserveError

WORDS = """
time year people way day man thing woman life child world school state family student group country
problem hand part place case week company system program question work government number night point
home water room mother area money story fact month lot right study book eye job word business issue
side kind head house service friend father power hour game line end member law car city community name
president team minute idea kid body information back parent face others level office door health person
art war history party result change morning reason research girl guy moment air teacher force education
river mountain garden window winter summer autumn spring forest ocean island desert valley bridge tower
market village castle harbor meadow engine signal planet comet orbit copper silver marble velvet canvas
lantern compass anchor feather pepper ginger olive lemon cherry maple cedar willow falcon otter badger
walk run jump read write speak listen build carry follow gather notice measure explore wander remember
quiet bright heavy gentle rapid ancient modern narrow broad hollow golden frozen tender distant curious
blue green purple orange yellow crimson amber violet scarlet bold calm brave clever eager fierce humble
""".split()


@dataclass(frozen=True)
class Prompt:
    text: str
    num_tokens: int  # as counted when built (exact with /tokenize, else estimated)
    max_tokens: int


class PromptBuilder:
    def __init__(self, client: AsyncClient, seed: int = 0):
        self.client, self.rng = client, random.Random(seed)
        self.method: str | None = None  # "tokenize" or "approximate", known after the first prompt

    async def text(self, num_tokens: int) -> tuple[str, int]:
        """A run of random words of about num_tokens tokens (exactly, when the server can count)."""
        if num_tokens <= 0:
            return "", 0
        words = " ".join(self.rng.choices(WORDS, k=num_tokens + 8))  # each word is at least one token
        if self.method != "approximate":
            try:
                ids = (await self.client.request("POST", "/tokenize", {
                    "prompt": words, "content": words, "add_special_tokens": False}))["tokens"]
                answer = await self.client.request("POST", "/detokenize", {"tokens": ids[:num_tokens]})
                self.method = "tokenize"
                return answer.get("prompt", answer.get("content", "")), min(num_tokens, len(ids))
            except (KvserveError, KeyError, TypeError):
                self.method = "approximate"
        return " ".join(words.split()[:num_tokens]), num_tokens

    async def build(self, num_prompts: int, input_len: tuple[int, int], output_len: tuple[int, int],
                    shared_prefix: int = 0) -> list[Prompt]:
        """input_len and output_len are (low, high) ranges, drawn uniformly; shared_prefix tokens of
        each prompt are the same for all (0: every prompt distinct from its first token)."""
        prefix, prefix_tokens = await self.text(shared_prefix)
        prompts = []
        for _ in range(num_prompts):
            total = self.rng.randint(*input_len)
            body, body_tokens = await self.text(max(1, total - prefix_tokens))
            text = f"{prefix} {body}" if prefix else body
            prompts.append(Prompt(text, prefix_tokens + body_tokens, self.rng.randint(*output_len)))
        return prompts


def parse_range(value: str) -> tuple[int, int]:
    """'128' -> (128, 128); '64-128' -> (64, 128)."""
    low, _, high = value.partition("-")
    low_n, high_n = int(low), int(high or low)
    if not 0 < low_n <= high_n:
        raise ValueError(f"not a length or range: {value!r} (use N or LOW-HIGH)")
    return low_n, high_n
