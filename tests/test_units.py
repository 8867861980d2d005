import pytest

from blockmirror.units import format_bytes, parse_duration, parse_size


@pytest.mark.parametrize("text,seconds", [("5s", 5.0), ("200ms", 0.2), ("1.5", 1.5),
                                          ("2m", 120.0), (" 3 s ", 3.0), (".5s", 0.5)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "5x", "-1s", "0", "0ms", "1e9999", "5 s s"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("text,n", [("65536", 65536), ("64k", 65536), ("4G", 4 << 30),
                                    ("512MiB", 512 << 20), ("1.5M", 3 << 19)])
def test_parse_size(text, n):
    assert parse_size(text) == n


def test_format_bytes():
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 << 30) == "3.0 GiB"
