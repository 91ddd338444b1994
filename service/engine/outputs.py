"""The output processor: a sampled token -> text, stop strings, length -> a RequestOutput in its sink.

The step core appends each sampled token to its sequence (the scheduler needs the ids at once) and
hands it here. On a GPU the rest waits (`defer`): the token is detokenized and sent while the device
runs the next step, unless it ends the sequence by a stop token or by length, which are known from the
ids alone. A stop string found one step late finishes the sequence then; the token its sequence got
meanwhile is never emitted.

A constrained sequence ends where its grammar does: "stop" once the matcher is complete (the last token
of a choice, or EOS where the grammar accepts it), "error" if the matcher refused a token. Both are
known from the ids alone, so neither waits a step; the next step's mask always sees the sampled token,
which the scheduler appends (and the grammar consumes) before the next step is launched.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from service.engine.sequence import Sequence, SequenceGroup

log = logging.getLogger("kvserve.engine")


@dataclass
class RequestOutput:
    """What one step produced for one sample of a request; the last one carries finish_reason."""
    request_id: str
    index: int  # which of the n samples
    new_text: str
    new_token_ids: list[int]
    logprobs: list[float] | None  # per new token: its logprob under the model
    top_logprobs: list[list[tuple[int, float]]] | None  # per new token: the top alternatives
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    finish_reason: str | None = None  # stop | length | abort | error
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


# finish(sequence, reason, its last output or None, error message or None): the step core's one release.
Finish = Callable[[Sequence, str, "RequestOutput | None", "str | None"], None]


class OutputProcessor:
    def __init__(self, max_model_len: int, defer: bool, finish: Finish):
        self.max_model_len = max_model_len
        self.defer = defer
        self._finish = finish
        self._deferred: list[tuple[Sequence, int, float | None, list | None]] = []  # (seq, token, logprob, top)
        self.undeliverable: list[SequenceGroup] = []  # groups whose sink failed: the core aborts them

    def add_token(self, seq: Sequence, token: int, logprob: float | None, top: list | None) -> None:
        """A token just appended to seq: emit it now, or after the next step has been launched."""
        if self.defer and token not in seq.stop_ids and not self.reached_length(seq) \
                and not grammar_ended(seq):
            self._deferred.append((seq, token, logprob, top))
        else:
            self._emit_token(seq, token, logprob, top)

    def flush(self) -> None:
        """Emit what earlier steps deferred."""
        deferred, self._deferred = self._deferred, []
        for seq, token, logprob, top in deferred:
            if not seq.is_finished:  # not aborted meanwhile
                self._emit_token(seq, token, logprob, top)

    def reached_length(self, seq: Sequence) -> bool:
        return seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len

    def _emit_token(self, seq: Sequence, token: int, logprob: float | None, top: list | None) -> None:
        """Detokenize a sequence's newest token, check its stop strings and length, and send the output."""
        detok = seq.detokenizer
        reason = stop_reason = None
        if seq.grammar is not None and seq.grammar.error is not None:
            self._finish(seq, "error", None, f"structured output: {seq.grammar.error}")
            return
        if token in seq.stop_ids:  # the sampler never picks one before min_tokens, unless a grammar must end
            text, reason, stop_reason = "", "stop", token
        else:
            text = detok.add(token)
            if detok.stop_matched is not None:
                reason, stop_reason = "stop", detok.stop_matched
            elif grammar_ended(seq):  # before length: the output is complete even on the last token allowed
                reason = "stop"
            elif self.reached_length(seq):
                reason = "length"
        out = output(seq, text, [token], None if logprob is None else [logprob], None if top is None else [top])
        out.stop_reason = stop_reason
        if reason is None:
            self.send(seq.group, out)
        else:
            self._finish(seq, reason, out, None)

    def final(self, seq: Sequence, reason: str, last: RequestOutput | None, error: str | None) -> RequestOutput:
        """A finished sequence's last output: `last` (or an empty one) with the text held back released."""
        out = last or output(seq, "", [])
        detok = seq.detokenizer
        if detok is not None and detok.stop_matched is None:
            out.new_text += detok.finish()  # release held-back text unless a stop string cut it
        out.finish_reason, out.error = reason, error
        return out

    def send(self, group: SequenceGroup, out: RequestOutput) -> None:
        """Deliver one output. A sink that raises must not break the step loop: log it, drop the sink,
        and have the core abort what is left of the request (nobody can receive it any more)."""
        if group.sink is None:
            return
        try:
            group.sink(out)
        except Exception:
            log.exception("output sink of request %s failed", out.request_id)
            group.sink = None
            if not out.finished:
                self.undeliverable.append(group)


def grammar_ended(seq: Sequence) -> bool:
    """A constrained sequence whose grammar is complete or broken: it takes no further token."""
    return seq.grammar is not None and seq.grammar.has_ended


def output(seq: Sequence, text: str, token_ids: list[int], logprobs=None, top_logprobs=None) -> RequestOutput:
    return RequestOutput(seq.request_id, seq.index, text, token_ids, logprobs, top_logprobs, seq.num_prompt_tokens,
                         seq.num_output_tokens, seq.num_cached_tokens)
