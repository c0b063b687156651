"""Prompt forecasts: exact with an offline tiktoken encoding, else the conservative estimate."""

from __future__ import annotations

import pytest
import tiktoken
import tiktoken.load

import runguard_autolog as runguard
from runguard_autolog import tokens

from .conftest import MODEL, chat

TEXT = "x" * 300  # 300 bytes
MESSAGES = [{"role": "user", "content": TEXT}]


def _byte_level_encoding() -> tiktoken.Encoding:
    """A tiny encoding built locally: every byte is one token (no merges, no download)."""
    return tiktoken.Encoding(
        name="runguard-test-bytes",
        pat_str=r"\S+|\s+",
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={},
    )


def test_fallback_estimate_is_documented_and_conservative():
    assert tokens.estimate_text("") == 0
    assert tokens.estimate_text("abc") == 1
    assert tokens.estimate_text("abcd") == 2
    assert tokens.estimate_text("é" * 3) == 2  # 6 UTF-8 bytes
    assert tokens.messages_tokens(MESSAGES, MODEL) == 3 + 4 + 100
    assert not tokens.is_exact(MODEL)


def test_no_encoding_is_downloaded_when_the_cache_is_empty(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))

    def no_network(*args, **kwargs):
        raise AssertionError("runguard tried to download an encoding")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    tokens.clear_encodings()
    assert tokens.counter_for("gpt-4o") is tokens.estimate_text
    assert list(tmp_path.iterdir()) == []


def test_exact_counts_with_a_registered_offline_encoding():
    runguard.register_encoding("gpt-4o-mini*", _byte_level_encoding())
    assert tokens.is_exact(MODEL)
    assert tokens.messages_tokens(MESSAGES, MODEL) == 3 + 4 + 300


def test_exact_and_estimated_forecasts_decide_differently(client, server):
    runguard.autolog(max_input_tokens=200)
    chat(client, messages=MESSAGES)  # estimate 107 <= 200: sent
    assert server.count() == 1
    runguard.reset()
    runguard.register_encoding("gpt-4o-mini*", _byte_level_encoding())
    with pytest.raises(runguard.RunGuardTripped) as info:  # exact 307 > 200: refused before sending
        chat(client, messages=MESSAGES)
    assert info.value.observed == 307
    assert server.count() == 1


def test_encodings_in_tiktokens_local_cache_are_used(tmp_path, monkeypatch):
    import base64
    import hashlib

    ranks = {bytes([i]): i for i in range(256)}
    data = "\n".join(f"{base64.b64encode(k).decode()} {v}" for k, v in ranks.items()).encode()
    url = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
    (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_bytes(data)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    import tiktoken.registry

    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    loaded = []

    def fake_get_encoding(name):
        loaded.append(name)
        return _byte_level_encoding()

    # tiktoken would hash-check the real file; our job is only to find it offline and load it once
    monkeypatch.setattr(tiktoken, "get_encoding", fake_get_encoding)
    tokens.clear_encodings()
    assert tokens.is_exact("gpt-4o")
    tokens.messages_tokens(MESSAGES, "gpt-4o")
    tokens.messages_tokens(MESSAGES, "gpt-4o")
    assert loaded == ["o200k_base"]  # resolved once per model, never per call


def test_message_shapes_are_estimated():
    parts = [{"role": "user", "content": [{"type": "text", "text": "abc"}, {"type": "image_url", "image_url": {"url": "x"}}]}]
    assert tokens.messages_tokens(parts, MODEL) == 3 + 4 + 1 + tokens.IMAGE_TOKENS
    assert tokens.input_tokens([[1, 2, 3], [4, 5]], "text-embedding-3-small") == 5
    assert tokens.input_tokens(["abc", "abcdef"], "text-embedding-3-small") == 3
