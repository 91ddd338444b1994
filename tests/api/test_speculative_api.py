"""Speculative decoding through the API, on the session server (exact float32, drafts off by default): a
request's `speculative_ngram` turns drafts on for it alone, the answer is the same as without them, and
/metrics counts the drafts proposed and accepted, by position too."""
from __future__ import annotations

import re

import httpx
import pytest

pytestmark = pytest.mark.slow
TEXT = ("kvserve is a small LLM inference server: our own decoder-only Transformer with a paged KV cache and exact "
        "incremental decoding, serving SmolLM2-135M-Instruct from its GGUF file. ")


def metric(metrics: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", metrics, re.M)
    return float(found.group(1)) if found else 0.0


def test_drafts_for_one_request_change_nothing_but_the_speed(server):
    messages = [{"role": "user", "content": f"{TEXT * 3}\n\nRepeat the text above exactly."}]
    with httpx.Client(base_url=server.url, timeout=300) as http:
        before = http.get("/metrics").text
        answers = [http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 96, "temperature": 0,
                                                          "logprobs": True, "speculative_ngram": k}).json()
                   for k in (0, 4)]
        after = http.get("/metrics").text
        refused = http.post("/v1/completions", json={"prompt": "x", "speculative_ngram": 17})
    plain, drafted = (answer["choices"][0] for answer in answers)
    assert drafted["message"]["content"] == plain["message"]["content"] and plain["message"]["content"]
    assert drafted["finish_reason"] == plain["finish_reason"]
    usage = [{k: answer["usage"][k] for k in ("prompt_tokens", "completion_tokens")} for answer in answers]
    assert usage[0] == usage[1]  # the second finds the prompt cached: only prompt_tokens_details differs
    assert [t["logprob"] for t in drafted["logprobs"]["content"]] == pytest.approx(
        [t["logprob"] for t in plain["logprobs"]["content"]], abs=1e-5)
    proposed = metric(after, "kvserve_spec_decode_num_draft_tokens_total") - \
        metric(before, "kvserve_spec_decode_num_draft_tokens_total")
    accepted = metric(after, "kvserve_spec_decode_num_accepted_tokens_total") - \
        metric(before, "kvserve_spec_decode_num_accepted_tokens_total")
    assert proposed > 0 and 0 < accepted <= proposed
    assert metric(after, 'kvserve_spec_decode_num_draft_tokens_per_pos_total{position="0"}') > 0
    assert metric(after, "kvserve_spec_decode_accepted_length_count") > 0
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "speculative_ngram"
