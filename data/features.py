"""Sparse target features: a table of categorical tokens per target -> jagged token lists.

    target_id   genre            year
    242         Comedy|Drama     1997        ->  target 242: [genre=Comedy, genre=Drama, year=1997]

Every (column, value) pair is one token of a shared vocabulary. Targets without a row
have no tokens; rows for targets that are not in the log are counted and reported.

Layout (by target index, values + offsets):

    offsets = [0, 3, 3, 5]      target 0 has 3 tokens, target 1 none, target 2 two
    tokens  = [t t t  t t]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from configs.schema import DataConfig
from data.events import IdMap
from data.readers import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TargetFeatures:
    offsets: np.ndarray  # [T + 1] int64
    tokens: np.ndarray  # [M] int64 token indices
    vocabulary: list[str]  # token index -> "column=value"
    report: dict

    @property
    def num_tokens(self) -> int:
        return len(self.vocabulary)


def _read_table(path: Path) -> pl.DataFrame:
    if not path.exists():
        raise DataError(f"{path}: no such file (data.target_features_path)")
    try:
        if path.suffix == ".parquet" or path.is_dir():
            return pl.read_parquet(path)
        if path.suffix in (".item", ".inter"):
            frame = pl.read_csv(path, separator="\t", infer_schema=False, quote_char=None, encoding="utf8-lossy")
            return frame.rename({c: c.split(":", 1)[0] for c in frame.columns})
        return pl.read_csv(path, infer_schema=False, encoding="utf8-lossy")
    except pl.exceptions.PolarsError as e:
        raise DataError(f"{path}: cannot read the target feature table: {e}") from None


def load_target_features(config: DataConfig, target_ids: IdMap, path: str | Path) -> TargetFeatures:
    path = Path(path)
    frame = _read_table(path)
    id_column = config.target_features_id_column
    if id_column not in frame.columns:
        raise DataError(
            f"{path}: missing the target ID column '{id_column}' (data.target_features_id_column); "
            f"the file has columns: {', '.join(frame.columns)}"
        )
    feature_columns = [c for c in frame.columns if c != id_column]
    if not feature_columns:
        raise DataError(f"{path}: no feature columns besides '{id_column}'")
    raw_ids = frame[id_column]
    if config.id_type == "int":
        parsed = raw_ids.cast(pl.String).str.strip_chars().cast(pl.Int64, strict=False)
        bad = parsed.is_null()
        if bad.any():
            row = int(bad.arg_true()[0])
            raise DataError(
                f"{path}: row {row + 1}: column '{id_column}': expected an integer ID, got {raw_ids[row]!r}"
            )
        raw_ids = parsed
    index = target_ids.to_index(raw_ids.to_list())
    known = index >= 0
    report = {"feature_rows": frame.height, "rows_for_unknown_targets": int((~known).sum())}
    if report["rows_for_unknown_targets"]:
        log.info("%s: %d feature row(s) name targets that are not in the log; ignored", path, report["rows_for_unknown_targets"])

    separator = config.target_features_separator
    tokens = (
        frame.with_columns(_target=pl.Series(index))
        .filter(pl.Series(known))
        .select(
            "_target",
            _token=pl.concat_list(
                [
                    pl.col(c).cast(pl.String).fill_null("").str.split(separator).list.eval(
                        pl.lit(f"{c}=") + pl.element().str.strip_chars()
                    )
                    for c in feature_columns
                ]
            ),
        )
        .explode("_token")
        .filter(~pl.col("_token").str.ends_with("="))  # empty cells carry no token
        .unique(maintain_order=True)
    )
    vocabulary = tokens["_token"].unique().sort()
    token_index = np.searchsorted(vocabulary.to_numpy(), tokens["_token"].to_numpy())
    order = np.lexsort((token_index, tokens["_target"].to_numpy()))
    targets_sorted = tokens["_target"].to_numpy()[order]
    counts = np.bincount(targets_sorted, minlength=len(target_ids))
    report["tokens"] = int(len(vocabulary))
    return TargetFeatures(
        offsets=np.r_[0, np.cumsum(counts)].astype(np.int64),
        tokens=token_index[order].astype(np.int64),
        vocabulary=vocabulary.to_list(),
        report=report,
    )
