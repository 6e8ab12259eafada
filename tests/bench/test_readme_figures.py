"""The README shows the quality table exactly as bench/quality.py last wrote it."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_quality_table_is_the_generated_one():
    generated = (ROOT / "bench" / "results" / "quality.md").read_text()
    table = "\n".join(line for line in generated.splitlines() if line.startswith("| "))
    assert table, "quality.md has no table"
    readme = (ROOT / "README.md").read_text()
    assert table in readme, "README's Quality table differs from bench/results/quality.md: paste it again"
    verdicts = [line for line in generated.splitlines() if line.startswith("- ")]
    assert verdicts and all(line in readme for line in verdicts)
