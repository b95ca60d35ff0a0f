from kemu.console import EscapeParser


def test_plain_bytes_pass_through():
    assert EscapeParser().feed(b"ls\r") == (b"ls\r", [])


def test_ctrl_a_x_quits_and_drops_the_rest():
    assert EscapeParser().feed(b"ab\x01xcd") == (b"ab", ["quit"])


def test_ctrl_a_ctrl_a_sends_one_ctrl_a():
    assert EscapeParser().feed(b"\x01\x01z") == (b"\x01z", [])


def test_escape_split_across_reads():
    p = EscapeParser()
    assert p.feed(b"q\x01") == (b"q", [])
    assert p.feed(b"h") == (b"", ["help"])
    assert p.feed(b"\x01x") == (b"", ["quit"])
