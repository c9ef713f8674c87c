"""metrics.jsonl bytes that are not UTF-8 (raylm writes ASCII: this is damage): a one-line
error naming the line on resume and for `read_metrics`, not a UnicodeDecodeError traceback;
in a last line still being written (cut by a crash) they are left out with that line."""

import pytest

from raylm.errors import DataError
from raylm.metrics import MetricsLog, read_metrics


def test_a_byte_that_is_not_utf8_is_a_one_line_error_naming_its_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_bytes(b'{"step": 1}\n{"step": 2, "note": "\xff"}\n{"step": 3}\n')
    for read in (lambda: read_metrics(str(tmp_path / "metrics.jsonl")), lambda: MetricsLog(str(tmp_path))):
        with pytest.raises(DataError, match=r"metrics.jsonl line 2: not UTF-8 text \(byte 0xff at column 22\)") as e:
            read()
        assert "\n" not in str(e.value)


def test_a_last_line_cut_inside_a_character_is_left_out(tmp_path):
    text = '{"step": 1, "loss": 2.0}\n{"step": 2, "note": "é"}'.encode()
    (tmp_path / "metrics.jsonl").write_bytes(text[:-3])  # cut inside the two bytes of é
    assert [r["step"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == [1]
    resumed = MetricsLog(str(tmp_path))
    resumed.truncate(1)
    assert (tmp_path / "metrics.jsonl").read_bytes() == b'{"step": 1, "loss": 2.0}\n'
