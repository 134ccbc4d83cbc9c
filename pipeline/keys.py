"""Source keys and the bitstream names they map to: one rule for every writer and reader.

The pipeline writes a source ``a/b.jpg`` as ``bitstreams/a/b.jpg.sga``; the decode service
(``jobs/serve.py``), metrics and refinement find it there again. Two things need care:

* **Names over 255 bytes.** Local filesystems allow at most 255 bytes per path segment
  (NAME_MAX), and ``.sga`` adds 4 to the source's own name, so a 252..255-byte source name
  has no ``<name>.sga``. A segment that would be longer than 255 bytes (UTF-8) is
  shortened deterministically to its first bytes (cut at a character boundary), ``~`` and
  16 hex digits of the SHA-256 of the whole segment, so that it is at most 255 bytes with
  the suffix: ``<first 234 bytes>~<hash>.sga``. The same rule applies on every backend, so
  an archive copied between S3 and a disk keeps its names. Only a name that already looks
  like such a shortened one (its own prefix plus the hash of the long name, in the same
  folder) could meet it; whoever can create that source file could overwrite the other.
* **Keys the decode service cannot take.** A key is also a URL path of the decode service
  (``/images/<key>``), so the pipeline refuses at planning what the service would refuse
  (:func:`key_problem`): control characters (a newline, a tab, ...), backslashes, names
  that are not UTF-8, empty / ``.`` / ``..`` segments, keys over ``MAX_KEY_BYTES``.

No dependencies beyond the standard library: the decode service imports this at start-up.
"""

from __future__ import annotations

import hashlib

MAX_NAME_BYTES = 255  # NAME_MAX of ext4, XFS, APFS, NTFS (in UTF-16 units there), ZFS
MAX_KEY_BYTES = 1000  # UTF-8; S3 keys are at most 1024 bytes with "bitstreams/" and ".sga"
BITSTREAMS = "bitstreams"
SUFFIX = ".sga"
_HASH_CHARS = 16  # 64 bits of SHA-256 in hex


def fit_name(name: str, suffix: str = "") -> str:
    """``name + suffix`` if that fits in MAX_NAME_BYTES (UTF-8), else its shortened form."""
    if len((name + suffix).encode("utf-8", "surrogateescape")) <= MAX_NAME_BYTES:
        return name + suffix
    raw = name.encode("utf-8", "surrogateescape")
    digest = hashlib.sha256(raw).hexdigest()[:_HASH_CHARS]
    room = MAX_NAME_BYTES - len(suffix.encode("utf-8")) - 1 - _HASH_CHARS
    head = raw[:room].decode("utf-8", "ignore")  # drop a character cut in half
    return f"{head}~{digest}{suffix}"


def bitstream_key(source_key: str) -> str:
    """The key, under the output root, of the bitstream of ``source_key``."""
    *folders, name = source_key.split("/")
    parts = [fit_name(folder) for folder in folders] + [fit_name(name, SUFFIX)]
    return "/".join([BITSTREAMS, *parts])


def key_problem(key: str) -> str | None:
    """Why ``key`` cannot be archived and served (a short phrase), or None if it can."""
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        return "key is not valid UTF-8 text"
    if size > MAX_KEY_BYTES:
        return f"key is {size} bytes long; at most {MAX_KEY_BYTES} are accepted"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        return "key contains a NUL or another control character (a newline, a tab, ...)"
    if "\\" in key:
        return "key contains a backslash; keys use '/' between folders"
    if key.startswith("/"):
        return "key must be relative, not absolute"
    if any(part in ("", ".", "..") for part in key.split("/")):
        return "key has an empty, '.' or '..' segment"
    return None


def as_text(text: str) -> str:
    """``text`` as valid Unicode: a name that is not UTF-8 (its undecodable bytes held as
    surrogates, as Python lists them) gets U+FFFD for them, so Parquet can store it."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
