"""Property tests for the one function every request body goes through."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsleep.web.router import OpenAIError, parse_model

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300)
@given(st.binary(max_size=512))
def test_any_bytes_give_a_model_or_a_400(body: bytes) -> None:
    try:
        model, stream, _ = parse_model(body)
    except OpenAIError as exc:
        assert exc.status == 400
        assert exc.type == "invalid_request_error"
    else:
        assert isinstance(model, str) and model
        assert isinstance(stream, bool)


@settings(max_examples=300)
@given(JSON, st.text(min_size=1), st.one_of(st.none(), st.booleans(), JSON))
def test_objects_with_a_model_string_are_routed_by_it(extra, model, stream) -> None:
    doc = {"extra": extra, "model": model}
    if stream is not None:
        doc["stream"] = stream
    body = json.dumps(doc).encode()
    if stream is None or isinstance(stream, bool):
        assert parse_model(body)[:2] == (model, bool(stream))
    else:
        try:
            parse_model(body)
        except OpenAIError as exc:
            assert exc.param == "stream"
        else:
            raise AssertionError("a non-boolean stream was accepted")


def test_deep_nesting_is_a_400_not_a_crash() -> None:
    body = b'{"model": "m", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(OpenAIError) as raised:
        parse_model(body)
    assert raised.value.status == 400
