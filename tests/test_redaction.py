"""Tests of persona_eval.redaction: which secrets are known, and how text and data are masked."""

from __future__ import annotations

import html
import json
import os

import pytest

from persona_eval import redaction
from persona_eval.errors import BackendError, DataError
from persona_eval.redaction import (
    find_secrets,
    known_secrets,
    mask,
    mask_found,
    placeholder,
    register_secret,
    scrub,
)

KEY = "sk-test-0123456789abcdef"


@pytest.fixture(autouse=True)
def no_secrets_but_the_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts from no known secret: none registered, none in the environment."""
    monkeypatch.setattr(redaction, "_registered", {})
    for name in list(os.environ):
        if name in ("OPENAI_API_KEY", "HF_TOKEN") or name.endswith(("_API_KEY", "_TOKEN", "_SECRET", "_PASSWORD")):
            monkeypatch.delenv(name)


# --- which secrets are known -------------------------------------------------------------------------


def test_known_secrets_are_the_secret_looking_variables_read_at_call_time(monkeypatch):
    secret_looking = {"OPENAI_API_KEY": KEY, "VENDOR_API_KEY": "vendor-key-0001", "HF_TOKEN": "hf_abcdefgh1234",
                      "GH_TOKEN": "ghp_0000111122223333", "APP_SECRET": "s3cr3t-value",
                      "DB_PASSWORD": "correct-horse-battery"}
    for name, value in secret_looking.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SIGNING_KEY", "not-looked-for-1")  # _KEY alone is too broad a suffix
    monkeypatch.setenv("API_KEY_HINT", "emergency-department")  # the suffix is what counts
    monkeypatch.setenv("SHORT_API_KEY", "abc1234")  # under 8 characters
    monkeypatch.setenv("EMPTY_TOKEN", "")
    assert dict(known_secrets()) == secret_looking
    monkeypatch.delenv("GH_TOKEN")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-rotated-0000000000")
    del secret_looking["GH_TOKEN"]
    assert dict(known_secrets()) == {**secret_looking, "OPENAI_API_KEY": "sk-rotated-0000000000"}


def test_registered_secrets_are_known_short_ones_ignored_and_the_first_name_kept(monkeypatch):
    register_secret("from-any-variable-1", "LLM_CREDENTIALS")
    register_secret("from-any-variable-1", "base_url password")
    register_secret("pin1234", "base_url password")  # under 8 characters
    assert known_secrets() == [("LLM_CREDENTIALS", "from-any-variable-1")]
    monkeypatch.setenv("OPENAI_API_KEY", "from-any-variable-1")  # the environment names it first
    assert known_secrets() == [("OPENAI_API_KEY", "from-any-variable-1")]


@pytest.mark.parametrize(("name", "expected"), [
    ("OPENAI_API_KEY", "[secret $OPENAI_API_KEY masked]"),
    ("base_url password", "[secret base_url password masked]"),
])
def test_placeholder_shows_a_variable_with_a_dollar_and_a_description_as_it_is(name, expected):
    assert placeholder(name) == expected


# --- masking text ------------------------------------------------------------------------------------


def test_mask_found_masks_every_secret_and_names_them_sorted(monkeypatch):
    monkeypatch.setenv("VENDOR_API_KEY", "vendor-key-0001")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    text = f"Answer: B Bearer {KEY}; retry with vendor-key-0001 or {KEY}"
    masked, names = mask_found(text)
    assert masked == ("Answer: B Bearer [secret $OPENAI_API_KEY masked]; retry with "
                      "[secret $VENDOR_API_KEY masked] or [secret $OPENAI_API_KEY masked]")
    assert names == ["OPENAI_API_KEY", "VENDOR_API_KEY"]
    assert mask(text) == masked
    assert mask(masked) == masked  # masking twice changes nothing


def test_the_longest_secret_is_masked_first(monkeypatch):
    # A key that contains another: the longer must be masked whole, not left with a tail showing.
    monkeypatch.setenv("SHORT_API_KEY", "sk-0123456789")
    monkeypatch.setenv("LONG_API_KEY", "sk-0123456789-extended")
    masked, names = mask_found("a sk-0123456789-extended b sk-0123456789 c")
    assert masked == "a [secret $LONG_API_KEY masked] b [secret $SHORT_API_KEY masked] c"
    assert names == ["LONG_API_KEY", "SHORT_API_KEY"]
    assert find_secrets("sk-0123456789-extended") == [(0, 22, "LONG_API_KEY")]


def test_a_registered_url_password_is_masked_by_its_description():
    register_secret("hunter2-but-longer", "base_url password")
    masked, names = mask_found("connection error (http://admin:hunter2-but-longer@gpu-host:8000/v1)")
    assert masked == "connection error (http://admin:[secret base_url password masked]@gpu-host:8000/v1)"
    assert names == ["base_url password"]


def test_short_values_are_never_looked_for(monkeypatch):
    monkeypatch.setenv("SHORT_API_KEY", "A B C")
    register_secret("Answer", "something")
    text = "Answer: A B C"
    assert mask_found(text) == (text, [])


@pytest.mark.parametrize("written", [
    lambda secret: json.dumps({"text": secret}, ensure_ascii=False),
    lambda secret: json.dumps({"text": secret}),
    lambda secret: f"<pre>{html.escape(secret, quote=True)}</pre>",
])
def test_a_secret_is_found_as_json_and_html_escape_it(monkeypatch, written):
    secret = 'p"a\\s<s>&wörd-1'
    monkeypatch.setenv("PROXY_PASSWORD", secret)
    masked, names = mask_found(written(secret))
    assert names == ["PROXY_PASSWORD"] and "wörd" not in masked and "w\\u00f6rd" not in masked


def test_text_without_secrets_is_returned_as_it_was(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    text = "Answer: C. Self-care at home; see your GP if it gets worse."
    assert mask_found(text) == (text, [])
    assert find_secrets(text) == []
    assert mask("") == ""


# --- masking data ------------------------------------------------------------------------------------


def test_scrub_masks_every_string_keys_too_and_keeps_the_shape(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    value = {"text": f"Bearer {KEY}", KEY: [KEY, 1, 2.5, None, True, ("x", KEY)], 3: {"nested": KEY}}
    ph = "[secret $OPENAI_API_KEY masked]"
    assert scrub(value) == {"text": f"Bearer {ph}", ph: [ph, 1, 2.5, None, True, ("x", ph)], 3: {"nested": ph}}
    assert value["text"] == f"Bearer {KEY}"  # the input is left as it was


def test_scrub_without_secrets_is_an_equal_deep_copy(monkeypatch):
    value = {"records": [{"case_id": "t1", "label_probs": {"A": 0.2}, "span": (3, 4)}], "n": 1}
    copy = scrub(value)
    assert copy == value and copy is not value
    assert copy["records"] is not value["records"] and copy["records"][0] is not value["records"][0]
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # known, but not in the value
    assert scrub(value) == value


# --- errors print masked -----------------------------------------------------------------------------


def test_an_error_holding_a_key_prints_masked(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    error = BackendError(f"model 'm': the server's reply is not JSON: echo Bearer {KEY}",
                         endpoint=f"http://proxy/{KEY}/v1/chat/completions", status=f"HTTP 502 ({KEY})")
    for shown in (str(error), repr(error), error.endpoint, error.status):
        assert KEY not in shown and "[secret $OPENAI_API_KEY masked]" in shown
    assert KEY not in str(DataError(f"token {KEY}", path="data.jsonl", line=3))
