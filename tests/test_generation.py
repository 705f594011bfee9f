"""The dialect-neutral helpers of mlxk/server/generation.py that every adapter translates through."""
import pytest

from mlxk.server.errors import InvalidRequest
from mlxk.server.generation import ANTHROPIC_BLOCKS, RESPONSES_PARTS, sse_event, text_of


@pytest.mark.parametrize("content, parts, text", [
    (None, ANTHROPIC_BLOCKS, ""),
    ("plain", RESPONSES_PARTS, "plain"),
    ([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], ANTHROPIC_BLOCKS, "a\nb"),
    ([{"type": "input_text", "text": "a"}, {"type": "refusal", "refusal": "b"}], RESPONSES_PARTS, "ab"),
    ([{"type": "document"}, {"type": "text", "text": "kept"}], ANTHROPIC_BLOCKS, "kept"),
])
def test_text_of_joins_each_dialects_text_parts(content, parts, text):
    assert text_of(content, "x", parts) == text


@pytest.mark.parametrize("content, parts, message", [
    (5, ANTHROPIC_BLOCKS, "x: must be a string or a list of content blocks"),
    (["bare"], RESPONSES_PARTS, "x[0]: a content part must be an object with a 'type'"),
    ([{"type": "image"}], ANTHROPIC_BLOCKS, "x[0]: image blocks are not supported: this server runs text models; "
                                            "send text"),
    ([{"type": "input_file"}], RESPONSES_PARTS, "x[0]: input_file parts are not supported: this server runs text "
                                                "models; send input_text"),
])
def test_text_of_refuses_what_it_cannot_read_naming_the_field(content, parts, message):
    with pytest.raises(InvalidRequest) as caught:
        text_of(content, "x", parts)
    assert caught.value.message == message
    assert caught.value.details["param"] == message.split(":")[0]


def test_sse_event_is_named_by_its_type():
    assert sse_event({"type": "ping"}) == b'event: ping\ndata: {"type":"ping"}\n\n'
