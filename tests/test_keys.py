"""pipeline.keys: bitstream names that fit any filesystem, and the keys the service can take."""

from __future__ import annotations

import pytest

from pipeline.keys import MAX_NAME_BYTES, as_text, bitstream_key, fit_name, key_problem
from pipeline.plan import make_plan, refusal
from pipeline.storage import ObjectInfo, Storage


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


@pytest.mark.parametrize("key", ["a\nb.jpg", "tab\there.png", "bell\x07.jpg", "del\x7f.jpg",
                                 "back\\slash.jpg", "caf\udce9.jpg", "/abs.jpg", "a//b.jpg",
                                 "a/../b.jpg", "k" * 1001])
def test_keys_the_service_cannot_take_have_a_problem(key: str) -> None:
    assert key_problem(key)


@pytest.mark.parametrize("key", ["a.jpg", "Ferien 2019/Strand ä #1 [a] 100%.png",
                                 "x" * 255 + "/" + "y" * 255, ".hidden/a.jpg"])
def test_ordinary_keys_have_none(key: str) -> None:
    assert key_problem(key) is None


def test_as_text_replaces_undecodable_bytes() -> None:
    assert as_text("caf\udce9.jpg") == "caf\ufffd.jpg"
    assert as_text("plain ä.jpg") == "plain ä.jpg"


def test_plan_refuses_keys_that_could_not_be_served(tmp_path) -> None:
    images = [ObjectInfo(key, 10, "v") for key in
              ("a.jpg", "line\nbreak.jpg", "caf\udce9.jpg", "b.jpg")]
    output = Storage(str(tmp_path / "out"))
    plan = make_plan(images, "file:///in", output, {}, "fp", 2)
    shards = list(plan.iter_shards(output))
    refused = {k: v for s in shards for k, v in (s.refused or {}).items()}
    assert set(refused) == {"line\nbreak.jpg", "caf\udce9.jpg"}
    assert "control character" in refused["line\nbreak.jpg"]
    assert refused["line\nbreak.jpg"] == refusal("line\nbreak.jpg")
    assert "refused at planning" in refused["line\nbreak.jpg"]
    assert plan.num_images == 4  # each still gets its row
    again = type(plan).from_json(plan.to_json())  # stored and resumed: the same decision
    assert [s.refused for s in again.iter_shards(output)] == [s.refused for s in shards]
