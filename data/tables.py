"""The one CSV / Parquet reader: training data (:mod:`.files`) and files to score
(``pollinate predict``, :mod:`pollinate.client.predictor`) read tables the same way.

A table comes back as pandas frames whose column names are strings and whose rows are
numbered 0..n-1 (a Parquet file's named index levels, e.g. a saved user id, become columns
again); the columns named in ``text_columns`` are read from a CSV as text, so ``007`` stays
``"007"``. What is wrong with a file is a :class:`TableError`; the caller words it for its
own users (a config key for training data, a command-line file for ``predict``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pollinate.text import one_line

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["SUFFIXES", "TableError", "iter_table", "table_kind"]

#: File suffix -> table kind.
SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


class TableError(ValueError):
    """A table file that cannot be read.

    Attributes
    ----------
    kind
        ``"csv"`` or ``"parquet"``.
    reason
        One line from the parser.
    empty
        The file holds nothing at all (not even a header row).
    """

    def __init__(self, kind: str, reason: str, *, empty: bool = False) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.empty = empty


def table_kind(path: Path) -> str | None:
    """``"csv"`` / ``"parquet"`` from the file's suffix, or None for any other suffix."""
    return SUFFIXES.get(path.suffix.lower())


def iter_table(
    path: Path, kind: str, *, text_columns: Sequence[str] = (), chunk_rows: int | None = None
) -> Iterator[pd.DataFrame]:
    """The table's rows: one frame (``chunk_rows`` None) or frames of ``chunk_rows`` rows.

    Empty chunks are skipped; a file with a header and no rows yields one empty frame when
    read whole. Raises :class:`TableError` for a file its parser cannot read.
    """
    # Lazy: pandas costs 1.1 s to import, pyarrow.parquet 0.7 s more (python -X importtime,
    # best of 3, 2 shared cores under load); a simulation worker imports data/ but never
    # reads a file.
    import pandas as pd

    dtype = dict.fromkeys(text_columns, str) or None
    try:
        if chunk_rows is None:
            whole = pd.read_csv(path, dtype=dtype) if kind == "csv" else pd.read_parquet(path)
            yield _tidy(whole)
        elif kind == "csv":
            with pd.read_csv(path, dtype=dtype, chunksize=chunk_rows) as reader:
                for df in reader:
                    if len(df):
                        yield _tidy(df)
        else:
            import pyarrow.parquet as pq

            with pq.ParquetFile(path) as parquet:
                for batch in parquet.iter_batches(batch_size=chunk_rows):
                    if batch.num_rows:
                        yield _tidy(batch.to_pandas())
    except pd.errors.EmptyDataError:
        raise TableError(kind, "no header row and no data", empty=True) from None
    except TableError:
        raise
    except Exception as e:  # parser, arrow, decoding and I/O errors all mean "unreadable"
        raise TableError(kind, one_line(e)) from None


def _tidy(df: pd.DataFrame) -> pd.DataFrame:
    # Named index levels (a Parquet file's saved index) become columns again; rows are
    # renumbered 0..n-1 so error messages can point at them.
    named = any(level is not None for level in df.index.names)
    df = df.reset_index(drop=not named)
    df.columns = [str(c) for c in df.columns]
    return df
