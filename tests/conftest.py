from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from hypothesis import settings

from configs.schema import DataConfig

# Property tests draw the same examples on every run (CI must not pass or fail by luck);
# `HYPOTHESIS_PROFILE=explore` draws fresh, and many more, to hunt for new failures.
settings.register_profile("default", derandomize=True)
settings.register_profile("explore", max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def write(tmp_path: Path):
    """write(name, text_or_bytes) -> path of a file in a fresh temporary directory."""

    def _write(name: str, content: str | bytes) -> Path:
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return path

    return _write


def data_config(path: Path | str, **overrides) -> DataConfig:
    return DataConfig(path=str(path), **overrides)


@pytest.fixture(autouse=True)
def _quiet_logs():
    logging.getLogger("data").setLevel(logging.ERROR)
