import json

from hypothesis import given
from hypothesis import strategies as st

from kemu.qmp.protocol import MAX_MESSAGE, QmpError, QmpSession, event, greeting


def session():
    def dispatch(name, args):
        if name == "boom":
            raise QmpError("it broke")
        return {"name": name, "args": args}
    return QmpSession(dispatch, lambda: {"query-status", "boom", "qmp_capabilities"})


def feed(s, text):
    return [r.data for r in s.feed(text.encode())]


def test_greeting_and_event_shapes():
    g = greeting((7, 2, 0), "kemu")
    assert g["QMP"]["version"]["qemu"] == {"major": 7, "minor": 2, "micro": 0}
    assert g["QMP"]["capabilities"] == []
    e = event("STOP")
    assert e["event"] == "STOP" and set(e["timestamp"]) == {"seconds", "microseconds"}


def test_commands_refused_until_negotiated():
    s = session()
    [r] = feed(s, '{"execute": "query-status", "id": 1}\n')
    assert r == {"error": {"class": "CommandNotFound", "desc":
                           "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": 1}
    assert feed(s, '{"execute": "qmp_capabilities"}') == [{"return": {}}]
    [r] = feed(s, '{"execute": "query-status", "arguments": {}, "id": "x"}')
    assert r == {"return": {"name": "query-status", "args": {}}, "id": "x"}
    [r] = feed(s, '{"execute": "qmp_capabilities"}')
    assert r["error"]["class"] == "CommandNotFound"


def test_malformed_input():
    s = session()
    feed(s, '{"execute": "qmp_capabilities"}')
    assert feed(s, "not json\n")[0]["error"]["desc"].startswith("JSON parse error")
    assert feed(s, "[1, 2]\n")[0]["error"]["desc"] == "QMP input must be a JSON object"
    assert feed(s, '{"foo": 1}')[0]["error"]["desc"] == "QMP input lacks member 'execute'"
    assert feed(s, '{"execute": "nope"}')[0]["error"] == {
        "class": "CommandNotFound", "desc": "The command nope has not been found"}
    assert feed(s, '{"execute": "boom"}')[0]["error"] == {"class": "GenericError",
                                                          "desc": "it broke"}
    assert "must be an object" in feed(s, '{"execute": "boom", "arguments": 3}')[0]["error"][
        "desc"]
    # the session still works after all that
    assert "return" in feed(s, '{"execute": "query-status"}')[0]


def test_messages_split_and_joined():
    s = session()
    assert feed(s, '{"execute": "qmp_') == []
    assert feed(s, 'capabilities"}{"execute": "query-status"}') == [
        {"return": {}}, {"return": {"name": "query-status", "args": {}}}]


def test_oversized_message_closes():
    s = session()
    responses = s.feed(b'{"execute": "' + b"x" * (MAX_MESSAGE + 10))
    assert responses and responses[-1].close
    assert "too long" in json.dumps(responses[-1].data)


def test_messages_span_reads_and_lines():
    s = session()
    feed(s, '{"execute": "qmp_capabilities"}')
    # pretty-printed, cut in the middle of a line and of a multi-byte character
    data = '{\n  "execute": "query-status",\n  "arguments": {},\n  "id": "é}{"\n}\n'.encode()
    cut = data.index("é".encode()) + 1
    assert s.feed(data[:20]) == [] and s.feed(data[20:cut]) == []
    [r] = [x.data for x in s.feed(data[cut:])]
    assert r == {"return": {"name": "query-status", "args": {}}, "id": "é}{"}


def test_strings_with_braces_and_escapes():
    s = session()
    feed(s, '{"execute": "qmp_capabilities"}')
    [r] = feed(s, r'{"execute": "query-status", "id": "a\"}{\\"}')
    assert r["id"] == 'a"}{\\'
    assert feed(s, '{"execute": "query-status", "id": "\\') == []     # escape pending
    assert feed(s, '""}')[0]["id"] == '"'


def test_unbalanced_and_garbage_recover():
    s = session()
    feed(s, '{"execute": "qmp_capabilities"}')
    assert feed(s, '{"execute": ]\n')[0]["error"]["desc"].startswith("JSON parse error")
    assert feed(s, '} trailing\n')[0]["error"]["desc"].startswith("JSON parse error")
    assert feed(s, '"just a string"\n')[0]["error"]["desc"] == "QMP input must be a JSON object"
    assert "return" in feed(s, '{"execute": "query-status"}')[0]


def test_invalid_utf8_is_an_error_and_the_session_goes_on():
    s = session()
    [r] = s.feed(b'{"execute": "\xff"}\n')
    assert r.data["error"]["desc"] == "JSON parse error, invalid UTF-8 sequence"
    assert feed(s, '{"execute": "qmp_capabilities"}') == [{"return": {}}]


def test_large_message_in_chunks_is_fast():
    import time
    s = session()
    feed(s, '{"execute": "qmp_capabilities"}')
    body = ('{"execute": "query-status", "id": "' + "x" * (MAX_MESSAGE - 100) + '"}').encode()
    t = time.monotonic()
    responses = []
    for i in range(0, len(body), 4096):
        responses += s.feed(body[i:i + 4096])
    assert time.monotonic() - t < 2
    assert len(responses) == 1 and "return" in responses[0].data


@given(st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_any_split_gives_the_same_responses(cuts):
    stream = ('{"execute": "qmp_capabilities"}\n{"execute": "query-status", "id": [1, {"k": '
              '"v\\"}"}]}\r\nnope\n[1]{"execute": "boom"}  {"execute":"query-status",\n'
              '"arguments":{}}\n').encode()
    whole = [r.data for r in session().feed(stream)]
    s = session()
    parts, last = [], 0
    for cut in sorted(c % (len(stream) + 1) for c in cuts):
        parts.append(stream[last:cut])
        last = cut
    parts.append(stream[last:])
    assert [r.data for p in parts for r in s.feed(p)] == whole
    assert len(whole) == 6
