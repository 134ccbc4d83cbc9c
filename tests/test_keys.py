"""pipeline.keys: bitstream names that fit any filesystem."""

from __future__ import annotations

import pytest

from pipeline.keys import MAX_NAME_BYTES, bitstream_key, fit_name


def nbytes(text: str) -> int:
    return len(text.encode("utf-8"))


def test_names_that_fit_keep_the_plain_form() -> None:
    assert bitstream_key("a.jpg") == "bitstreams/a.jpg.sga"
    assert bitstream_key("2024/img 1.jpg") == "bitstreams/2024/img 1.jpg.sga"
    name = "n" * 247 + ".jpg"  # 251 bytes: with ".sga" exactly 255
    assert bitstream_key(f"d/{name}") == f"bitstreams/d/{name}.sga"


@pytest.mark.parametrize("size", [252, 253, 254, 255, 300, 1000])
def test_long_names_are_shortened_to_255_bytes_deterministically(size: int) -> None:
    name = "x" * (size - 4) + ".jpg"
    key = bitstream_key(f"folder/{name}")
    folder, short = key.rsplit("/", 1)
    assert folder == "bitstreams/folder"
    assert nbytes(short) <= MAX_NAME_BYTES and short.endswith(".sga")
    assert short.startswith("x" * 200) and "~" in short
    assert bitstream_key(f"folder/{name}") == key  # every reader finds the same name
    other = "x" * (size - 4) + ".png"  # same prefix, other name: another stream
    assert bitstream_key(f"folder/{other}") != key


def test_shortening_cuts_between_characters() -> None:
    for width in (2, 3, 4):  # é, €, 𝄞 (UTF-8 bytes per character)
        char = {2: "é", 3: "€", 4: "𝄞"}[width]
        name = char * (260 // width)
        short = fit_name(name, ".sga")
        assert nbytes(short) <= MAX_NAME_BYTES
        head = short.split("~")[0]
        assert head and set(head) == {char}  # whole characters only


def test_long_folder_segments_are_shortened_too() -> None:
    """An S3 source may have folder names over 255 bytes; a local archive could not."""
    key = bitstream_key("f" * 300 + "/a.jpg")
    folder = key.split("/")[1]
    assert nbytes(folder) <= MAX_NAME_BYTES and not folder.endswith(".sga")
    assert key.endswith("/a.jpg.sga")
