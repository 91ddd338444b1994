"""A GGUF's SentencePiece vocabulary (tokenizer.ggml.model "llama", as llama.cpp's converter writes it from a
tokenizer.model) read by kvserve (model/spm_vocab.py) splits text exactly as sentencepiece itself does, and
decodes every split back to its text."""
from __future__ import annotations

import transformers

from model.loading.gguf_file import open_gguf
from model.tokenizer import tokenizer_from_gguf
from tests.model import sentencepiece_model
from tests.model.test_gguf_families import convert

TEXTS = [
    "Hello world", "The KV cache holds every layer's keys and values.", "  two leading spaces, and  two inside",
    "tabs\tand\nnew lines\n\n", "digits 1234567890 and 3.14", "ünïcödé, 日本語, Ελληνικά, emoji 🤖🚀",
    "`make test` -> (venv) $ kvserve serve --model ./m.gguf", "x" * 50,
]


def test_sentencepiece_vocabulary_splits_as_sentencepiece_does(tmp_path):
    processor = sentencepiece_model.train(tmp_path)
    config = transformers.LlamaConfig(vocab_size=processor.vocab_size(), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)  # the converter needs a model beside it
    path = convert(tmp_path)
    tokenizer = tokenizer_from_gguf(open_gguf(path), path)
    assert tokenizer.vocab_size == processor.vocab_size()
    assert tokenizer.bos_token_id == processor.bos_id() and tokenizer.eos_token_id == processor.eos_id()
    assert tokenizer.add_bos  # llama.cpp puts BOS first in a SentencePiece model's prompts
    for text in TEXTS:
        ids = tokenizer.encode(text)[1:]  # after BOS
        assert ids == processor.encode(text), text
        assert any(processor.id_to_piece(i).startswith("<0x") for i in ids) or "🤖" not in text
        # Every piece's text joined is the text after the "▁" put before it; token by token the same.
        assert tokenizer.decode(ids) == " " + text
        assert b"".join(tokenizer.token_bytes(i) for i in ids).decode() == " " + text
    # A special token's text in a prompt is that token, and the text after it gets its own "▁" (llama.cpp).
    ids = tokenizer.encode("hello</s>world")[1:]
    assert ids == processor.encode("hello") + [processor.eos_id()] + processor.encode("world")
