"""Cleaning and the tail split: C1 control characters go like the C0 ones (NEL becomes a line
break), and a PII placeholder at the start of a document is never cut in two."""

from __future__ import annotations

import pytest

from raylm.documents import clean_text, tail_split
from raylm.pii import PLACEHOLDERS


def test_c1_control_characters_are_removed_and_next_line_breaks_the_line():
    assert clean_text("a\x80b\x9fc\x9bd") == "abcd"
    assert clean_text("first\x85second") == "first\nsecond"
    assert clean_text("caf\u00e9 \u00a0ok") == "caf\u00e9  ok"  # printable Latin-1 stays


@pytest.mark.parametrize("placeholder", list(PLACEHOLDERS.values()))
@pytest.mark.parametrize("rest", ["", "!", " x", "\nmore"])
def test_a_placeholder_at_the_start_is_not_cut(placeholder, rest):
    text = placeholder + rest
    for fraction in (0.02, 0.1, 0.3, 0.5, 0.9):
        head, tail = tail_split(text, fraction)
        assert head + tail == text
        assert placeholder in head or placeholder in tail, (fraction, head, tail)


def test_pickled_objects_nested_in_a_list_view_are_refused_unread(tmp_path):
    """A parquet file may name list views in its Arrow schema; Ray Data's object extension
    type inside one was converted (so unpickled: the code ran) before the check saw it."""
    import io
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data  # noqa: F401  (registers Ray's extension types, as in a Ray Data task)
    from ray.data._internal.object_extensions.arrow import ArrowPythonObjectArray

    from raylm.chat_data import parse_records
    from raylm.data import DataError
    from raylm.documents import parse_documents

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    objects = ArrowPythonObjectArray.from_objects([Payload()])
    for make in (lambda: pa.ListViewArray.from_arrays(pa.array([0], pa.int32()), pa.array([1], pa.int32()), objects),
                 lambda: pa.LargeListViewArray.from_arrays(pa.array([0], pa.int64()), pa.array([1], pa.int64()),
                                                           objects)):
        for column in ("text", "messages"):
            sink = io.BytesIO()
            pq.write_table(pa.table({column: make()}), sink)
            raw = sink.getvalue()
            for got in (list(parse_documents("c/evil.parquet", raw, column)), list(parse_records("c/evil.parquet", raw))):
                [(_, err)] = got
                assert isinstance(err, DataError) and "ray.data.arrow_pickled_object" in str(err), err
            assert not marker.exists()


def test_every_nesting_of_an_extension_type_is_refused():
    import pyarrow as pa
    import ray.data  # noqa: F401
    from ray.data._internal.object_extensions.arrow import ArrowPythonObjectType

    from raylm.data import DataError
    from raylm.documents import check_plain_types

    ext = ArrowPythonObjectType()
    for t in (ext, pa.list_(ext), pa.large_list(ext), pa.list_(ext, 2), pa.list_view(ext), pa.large_list_view(ext),
              pa.struct([("a", pa.int32()), ("b", pa.list_view(ext))]), pa.map_(pa.string(), ext),
              pa.dictionary(pa.int32(), ext), pa.run_end_encoded(pa.int32(), ext),
              pa.dense_union([pa.field("a", pa.string()), pa.field("b", ext)])):
        with pytest.raises(DataError, match="arrow_pickled_object"):
            check_plain_types(pa.schema([("x", t)]), "f.parquet")
    check_plain_types(pa.schema([("text", pa.string()), ("d", pa.dictionary(pa.int32(), pa.string())),
                                 ("l", pa.list_view(pa.struct([("a", pa.int64())])))]), "f.parquet")  # plain
