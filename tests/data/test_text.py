"""The one delimited-text reader: multi-character delimiters (also across read blocks), Latin-1,
blank lines, and ragged rows named by file, line and column."""
from __future__ import annotations

import pyarrow as pa
import pytest

from loopfm.data.errors import DataError
from loopfm.data.text import DelimitedReader, _Substituted, iter_text_chunks


@pytest.mark.parametrize("block", [1, 2, 3, 5, 64])
def test_multi_character_delimiter_across_blocks(tmp_path, block):
    path = tmp_path / "r.dat"
    path.write_bytes(b"1::22::3:3::x\n4::::6::\n")
    with _Substituted(str(path), b"::", block=block) as f:
        assert f.read() == b"1\x1f22\x1f3:3\x1fx\n4\x1f\x1f6\x1f\n"


def test_dat_file_latin1_blank_lines_and_names(tmp_path):
    path = tmp_path / "movies.dat"
    path.write_bytes("1::Café (1993)::Comedy\n\n2::\"Great\" Cats (1998)::Musical\n".encode("latin-1"))
    reader = DelimitedReader(str(path), delimiter="::", header=False, columns=["id", "title", "genres"],
                             encoding="latin-1", include=["id", "title"], chunk_rows=1)
    tables = list(reader.tables())
    assert pa.concat_tables(tables).column("title").to_pylist() == ["Café (1993)", '"Great" Cats (1998)']
    assert [reader.line(k) for k in range(2)] == [1, 3]  # the blank line is counted


def test_ragged_rows_and_the_unit_separator(tmp_path):
    path = tmp_path / "r.dat"
    path.write_text("1::2::3\n4::5::6\n7::8\n")
    reader = DelimitedReader(str(path), delimiter="::", header=False, columns=["a", "b", "c"], include=["a"])
    with pytest.raises(DataError, match=r"row 3, column 'c': expected 3 fields, got 2 .*'7::8'"):
        list(reader.tables())
    path.write_text("1::2\x1f::3\n")
    with pytest.raises(DataError, match="U\\+001F"):
        list(DelimitedReader(str(path), delimiter="::", header=False, columns=["a", "b", "c"]).tables())


def test_iter_text_chunks_keeps_every_line_a_row(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a,b\n1,2\n\n3,4\n")
    chunks = list(iter_text_chunks(path, names=["a", "b"], use=["a", "b"], chunk_rows=2))
    assert [line for _, line in chunks] == [2, 4]
    assert pa.concat_tables([t for t, _ in chunks]).column("a").to_pylist() == ["1", "", "3"]
