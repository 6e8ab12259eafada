"""Sparse target features: tokens per target, unknown targets reported, bad tables named."""

from __future__ import annotations

import numpy as np
import pytest

from data.events import load_events
from data.features import load_target_features
from data.readers import DataError
from tests.conftest import data_config


def _log(write):
    return load_events(data_config(write("g.txt", "1 10 5\n1 20 6\n2 30 7\n")))


def test_tokens_per_target_from_a_csv_table(write):
    log = _log(write)  # shared ID space: 1, 2, 10, 20, 30 -> 0..4
    path = write("items.csv", "target,genre,year\n10,Comedy|Drama,1997\n30,,2001\n99,Horror,1980\n")
    features = load_target_features(data_config("x"), log.target_ids, path)
    assert features.report == {"feature_rows": 3, "rows_for_unknown_targets": 1, "tokens": 4}

    def tokens_of(raw: int) -> list[str]:
        i = int(log.target_ids.to_index([raw])[0])
        return sorted(features.vocabulary[t] for t in features.tokens[features.offsets[i] : features.offsets[i + 1]])

    assert tokens_of(10) == ["genre=Comedy", "genre=Drama", "year=1997"]
    assert tokens_of(30) == ["year=2001"]  # the empty genre cell carries no token
    assert tokens_of(20) == []
    assert len(features.offsets) == len(log.target_ids) + 1
    assert np.all(np.diff(features.offsets) >= 0)


def test_recbole_item_file_with_typed_header(write):
    log = _log(write)
    path = write("x.item", "item_id:token\tclass:token_seq\n10\ta b\n")
    config = data_config("x", target_features_id_column="item_id", target_features_separator=" ")
    features = load_target_features(config, log.target_ids, path)
    assert sorted(features.vocabulary) == ["class=a", "class=b"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("id,genre\n10,a\n", r"missing the target ID column 'target'.*id, genre"),
        ("target\n10\n", r"no feature columns"),
        ("target,genre\nten,a\n", r"row 1: column 'target': expected an integer ID, got 'ten'"),
    ],
)
def test_bad_feature_tables_name_file_row_and_column(write, content, expected):
    with pytest.raises(DataError, match=expected):
        load_target_features(data_config("x"), _log(write).target_ids, write("items.csv", content))
