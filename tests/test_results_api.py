"""harness.results: the runs and examples DataFrames (columns, dtypes, values) and `harness results` in every format
(table, csv, json, parquet) read back into the same frame.

The store is test_report's hand-made one (28 finished runs of model ``m``, one failed run, one random-init run;
25 examples per run); the schema-1 fixture store checks the columns that are missing there.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from harness import results
from harness.cli import main
from harness.errors import HarnessError
from harness.store import Store
from tests.test_report import N, build_store

FIXTURES = Path(__file__).parent / "fixtures"
TEXT_COLUMNS = ("run_id", "status", "task", "method", "model", "template", "preset")


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("results") / "harness.sqlite"
    build_store(path)
    return path


@pytest.fixture(scope="module")
def df(store_path):
    return results.runs(store_path)


def invoke(*args):
    return CliRunner().invoke(main, ["results", *map(str, args)])


def test_runs_columns_and_dtypes(df, store_path):
    assert tuple(df.columns) == results.RUN_COLUMNS
    assert len(df) == 30 and df["status"].value_counts().to_dict() == {"finished": 29, "failed": 1}
    for column in results.INT_COLUMNS:
        assert df[column].dtype == "Int64", column
    for column in results.FLOAT_COLUMNS:
        assert df[column].dtype == "float64", column
    for column in results.BOOL_COLUMNS:
        assert df[column].dtype == bool, column
    for column in TEXT_COLUMNS:
        assert pd.api.types.is_string_dtype(df[column]), column
    assert all(isinstance(df[c].iloc[0], dict) for c in ("config", "env", "extra"))
    # the numbers are the store's, and a Store object reads the same as its path
    lora = df[(df["method"] == "lora") & (df["task"] == "rte") & (df["template"] == "t0") & (df["seed"] == 1)
              & (df["status"] == "finished")].iloc[0]
    assert lora["accuracy"] == 16 / N and lora["n_eval"] == N and lora["trainable_params"] == 460_800
    assert lora["config"]["kv_cache"] is True
    pd.testing.assert_frame_equal(results.runs(Store(store_path)), df)
    failed = df[df["status"] == "failed"].iloc[0]
    assert pd.isna(failed["accuracy"]) and pd.isna(failed["n_eval"]) and failed["error"] == "boom"


def test_runs_filters(store_path):
    assert set(results.runs(store_path, status="finished")["status"]) == {"finished"}
    assert not results.runs(store_path, include_random=False)["is_random"].any()
    assert results.runs(store_path)["is_random"].sum() == 1


def test_examples_columns_dtypes_and_correctness(store_path, df):
    ex = results.examples(store_path)
    assert tuple(ex.columns) == results.EXAMPLE_COLUMNS
    assert len(ex) == N * len(df)
    for column in ("seed", "k", "position", "label", "prediction", "prediction_norm", "prediction_norm_char"):
        assert ex[column].dtype == "Int64", column
    assert ex["correct"].dtype == bool
    assert all(len(lp) == len(nt) == len(nc) == 2 for lp, nt, nc in zip(ex["logprobs"], ex["n_tokens"], ex["n_chars"]))
    # per run, the share of correct examples is the stored accuracy; the run columns are the run's
    finished = df[df["status"] == "finished"].set_index("run_id")
    share = ex.groupby("run_id")["correct"].mean()
    pd.testing.assert_series_equal(share[finished.index], finished["accuracy"], check_names=False)
    merged = ex.drop_duplicates("run_id").set_index("run_id")
    pd.testing.assert_frame_equal(merged.loc[finished.index, ["task", "method", "seed"]],
                                  finished[["task", "method", "seed"]])
    one = finished.index[0]
    assert list(results.examples(store_path, [one])["position"]) == list(range(N))


def test_schema_1_store_has_missing_per_character_columns(tmp_path):
    old = tmp_path / "v1.sqlite"
    shutil.copyfile(FIXTURES / "store_v1.sqlite", old)
    runs = results.runs(old)
    assert runs["n_chars_with_delimiter"].all() and runs["accuracy_norm_char"].isna().all()
    assert runs.loc[runs["status"] == "finished", "accuracy"].notna().all()
    ex = results.examples(old)
    assert ex["prediction_norm_char"].isna().all() and ex["prediction"].notna().all()


def test_missing_store_is_an_error(tmp_path):
    with pytest.raises(HarnessError, match="no results store"):
        results.runs(tmp_path / "nope.sqlite")
    assert not (tmp_path / "nope.sqlite").exists()


def test_records_are_plain_python(df):
    (row,) = results.records(df[df["status"] == "failed"].head(1))
    assert row["accuracy"] is None and row["n_eval"] is None and type(row["seed"]) is int
    json.dumps({k: v for k, v in row.items()})  # every value serializes


# ---- harness results ------------------------------------------------------------------------------------------

def expected(df: pd.DataFrame) -> pd.DataFrame:
    return df[list(results.RESULT_FIELDS)]


def test_csv_round_trip(store_path, df, tmp_path):
    out = invoke("--store", store_path, "--format", "csv")
    assert out.exit_code == 0, out.output
    back = pd.read_csv(io.StringIO(out.output), dtype=dict.fromkeys(results.INT_COLUMNS, "Int64"))
    pd.testing.assert_frame_equal(back, expected(df), check_dtype=False)
    assert invoke("--store", store_path, "--format", "csv", "--out", tmp_path / "r.csv").exit_code == 0
    assert (tmp_path / "r.csv").read_bytes() == out.stdout_bytes and b"\r\n" in out.stdout_bytes


def test_json_round_trip(store_path, df):
    out = invoke("--store", store_path, "--format", "json", "--status", "finished")
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    assert rows == results.records(expected(df[df["status"] == "finished"]))
    assert list(rows[0]) == list(results.RESULT_FIELDS)


def test_parquet_round_trip(store_path, df, tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "runs.parquet"
    out = invoke("--store", store_path, "--format", "parquet", "--out", path)
    assert out.exit_code == 0 and out.output == ""
    back = pd.read_parquet(path)
    assert back["n_eval"].dtype == "Int64" and back["accuracy"].dtype == "float64"
    pd.testing.assert_frame_equal(back, expected(df), check_dtype=False)


def test_parquet_needs_out_and_pyarrow(store_path, tmp_path, monkeypatch):
    out = invoke("--store", store_path, "--format", "parquet")
    assert out.exit_code == 2 and "--out FILE" in out.output
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    out = invoke("--store", store_path, "--format", "parquet", "--out", tmp_path / "r.parquet")
    assert out.exit_code == 2 and "pip install pyarrow" in out.output
    assert [line for line in out.output.splitlines() if line.startswith("Error")] == [out.output.strip()]
    assert not (tmp_path / "r.parquet").exists()


def test_table(store_path):
    out = invoke("--store", store_path)
    assert out.exit_code == 0, out.output
    header, *lines = out.output.splitlines()
    assert header.split() == list(results.TABLE_FIELDS) and len(lines) == 30
    failed = next(line for line in lines if line.endswith("failed"))
    assert failed.split()[6:-1] == ["-"] * 6  # no figures
    assert "0.64" in out.output  # 16/25, four decimals without trailing zeros
    assert results.fmt_cell(2.224e10) == "2.224e+10" and results.fmt_cell(414.81152) == "414.8115"
    assert results.fmt_cell(0.0) == "0" and results.fmt_cell(None) == "-" and results.fmt_cell(pd.NA) == "-"
