"""Writes the Parquet and CSV fixtures that node/src/table.rs reads to prove it reads what
hospitals produce: pandas.DataFrame.to_parquet (pyarrow engine) and to_csv with their defaults.

Run from the repository root (needs pandas and pyarrow, e.g. a venv with `pip install pandas pyarrow`):
    python node/testdata/tables/make_pandas_tables.py
The table is made up (no patient data). Re-running rewrites the files; the Rust test compares the
Parquet files with the CSV cell by cell, so the files must be written together.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow

OUT = Path(__file__).resolve().parent


def table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            # float64 with a NaN: pyarrow writes the NaN as a Parquet null, to_csv as "".
            "age": [63.0, 37.5, np.nan, 56.25, 57.0, 41.0, 44.0, 52.0, 57.0, 54.0],
            "sex": np.array([1, 1, 0, 1, 0, 0, 1, 1, 1, 1], dtype=np.int64),
            # A categorical: pyarrow writes dictionary-encoded strings.
            "cp": pd.Categorical(["typical", "non-anginal", "atypical", "atypical", "asymptomatic",
                                  "atypical", "atypical", "non-anginal", "non-anginal", "asymptomatic"]),
            "smoker": [True, False, False, True, True, False, False, True, False, True],
            # pandas' nullable integer: INT32 with nulls.
            "visits": pd.array([3, None, 1, 0, 2, None, 5, 1, 1, 2], dtype="Int32"),
            # Python strings with a None: BYTE_ARRAY (STRING), not dictionary-typed.
            "ward": ["north", "south", None, "east", "west", "north", "south", "east", "west", "north"],
            "split": ["train"] * 7 + ["test"] * 3,
        }
    )


def main() -> None:
    df = table()
    # Three row groups (4, 4, 2 rows), so positions across pyarrow's row groups are exercised.
    df.to_parquet(OUT / "pandas_snappy.parquet", index=False, row_group_size=4)  # snappy is the default
    df.to_parquet(OUT / "pandas_none.parquet", index=False, compression=None)
    df.to_parquet(OUT / "pandas_zstd.parquet", index=False, compression="zstd")
    df.to_parquet(OUT / "pandas_gzip.parquet", index=False, compression="gzip")
    df.to_csv(OUT / "pandas.csv", index=False)
    # A datetime column, which the reader refuses naming the column.
    stamped = df.assign(admitted=pd.date_range("2024-01-01", periods=len(df), freq="D"))
    stamped.to_parquet(OUT / "pandas_timestamp.parquet", index=False)
    print(f"pandas {pd.__version__}, pyarrow {pyarrow.__version__}: wrote fixtures to {OUT}")


if __name__ == "__main__":
    main()
