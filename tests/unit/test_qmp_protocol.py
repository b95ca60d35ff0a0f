import json

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
