"""A gzipped corpus or record file that expands far beyond any text (a decompression bomb)
is refused in one line naming it, in bounded memory; real gzip files read as before."""

import gzip
import subprocess
import sys

import pytest

from raylm.documents import decompressed

# 1 GiB of one repeated byte in a JSON line, as gzip members (each 64 MiB of "a" is 64 KB):
# about 1 MB in all.
BOMB = """
import gzip
a = gzip.compress(b"a" * (64 << 20))
raw = gzip.compress(b'{"text": "') + a * 16 + gzip.compress(b'"}\\n')
"""


def test_a_gzip_bomb_is_refused_within_a_memory_limit():
    """Run with 1.5 GiB of address space: the bomb's 1 GiB, read whole, and a parse's copies
    of it do not fit; refused after a bounded read, it is one DataError line."""
    code = BOMB + """
import resource
resource.setrlimit(resource.RLIMIT_AS, (1536 << 20, 1536 << 20))
from raylm.chat_data import parse_records
from raylm.documents import parse_documents
for got in (list(parse_documents("c/bomb.jsonl.gz", raw, "text")), list(parse_records("c/bomb.jsonl.gz", raw))):
    [(_, err)] = got
    print(type(err).__name__, err)
"""
    imports = "import pyarrow, numpy, raylm.chat_data, raylm.documents\n"  # loaded before the limit
    result = subprocess.run([sys.executable, "-c", imports + code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(ln.startswith("DataError c/bomb.jsonl.gz: decompresses to more than") for ln in lines), \
        result.stdout[-2000:]


def test_gzip_files_of_text_still_read_whole_and_damaged_ones_are_named():
    text = "".join(f'{{"text": "document {i}: the quick brown fox"}}\n' for i in range(20000)).encode()
    packed = gzip.compress(text)
    assert decompressed("c/x.jsonl.GZ", packed) == text
    assert decompressed("c/two.jsonl.gz", packed + gzip.compress(b"more\n")) == text + b"more\n"  # two members
    from raylm.errors import DataError
    with pytest.raises(DataError, match="c/x.jsonl.gz: truncated or corrupt gzip"):
        decompressed("c/x.jsonl.gz", packed[:-100])
    with pytest.raises(DataError, match="c/x.jsonl.gz: truncated or corrupt gzip"):
        decompressed("c/x.jsonl.gz", b"not gzip at all")
