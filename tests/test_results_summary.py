"""The Summary table of ``benchmarks/RESULTS.md`` against the JSON files it quotes (issue 38).

Each row of the table names its JSON files in the ``source`` column and carries, in the same cell, an
HTML comment that says how to get every number of its ``figure`` and ``seeds`` cells from them::

    <!-- check: C = J('self_distillation_cifar10.json')['results']['0.1'] ;; mean(...) => {:.2f}% ;; seeds: ... => {} -->

Parts are separated by ``;;``. ``NAME = EXPR`` binds a name for the parts after it; ``EXPR => FORMAT``
is one number of the ``figure`` cell, ``seeds: EXPR => FORMAT`` one of the ``seeds`` cell. EXPR is a
Python expression over the helpers below (``J(name)`` reads ``benchmarks/results/name``); FORMAT is a
``str.format`` template. Each formatted value must appear in its cell, in the order of the checks, as
printed (a minus sign written as U+2212 counts as ``-``), and every number in those two cells must be
one of them. So a rerun that changes a stored number, or an edit of a digit in the table, fails here
until the two agree again. No model is built and nothing is trained: the test reads text and JSON.
"""

from __future__ import annotations

import functools
import glob
import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
ARCHIVE_MD = ROOT / "benchmarks" / "RESULTS_ARCHIVE.md"
RESULTS_DIR = ROOT / "benchmarks" / "results"
COLUMNS = ["what", "setting", "figure", "seeds", "how chosen", "section", "source"]
CHECK = re.compile(r"<!--\s*check:(.*?)-->", re.DOTALL)
JSON_NAME = re.compile(r"[\w.*-]+\.json")


# ---------------------------------------------------------------------------------------------------
# Helpers the check expressions may use.


@functools.cache
def _load(name: str) -> Any:
    return json.loads((RESULTS_DIR / name).read_text())


def J(name: str) -> Any:
    """The JSON file ``benchmarks/results/<name>``."""
    return _load(name)


def mean(values) -> float:
    return statistics.fmean(values)


def gmean(values) -> float:
    return statistics.geometric_mean(values)


def sem(values) -> float:
    """Standard error of the mean (sample standard deviation / sqrt(n))."""
    values = list(values)
    return statistics.stdev(values) / math.sqrt(len(values))


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` (a fraction) measured on ``n`` samples."""
    return math.sqrt(p * (1 - p) / n)


def pct(fraction: float) -> float:
    return 100 * fraction


def same(*values):
    """The one value all of ``values`` equal (an error if they differ)."""
    assert values and all(v == values[0] for v in values), f"expected equal values, got {values}"
    return values[0]


def require(condition: bool, value):
    """``value``, if ``condition`` holds (an error otherwise)."""
    assert condition, "a condition of this row does not hold"
    return value


def seeds(values) -> str:
    """Seeds as the table prints them: ``0, 1, 2``."""
    return ", ".join(str(v) for v in values)


def seed_of(text: str) -> int:
    """The seed named in a run folder (``.../default-lr0.1-seed0``) or a command holding one."""
    found = set(re.findall(r"-seed(\d+)", text))
    assert len(found) == 1, f"no single seed in {text!r}"
    return int(found.pop())


def run(entry: dict, seed: int) -> dict:
    """One run of a ``self_distillation_*.json`` entry (a variant at a learning rate), by seed."""
    return entry["runs"][entry["seeds"].index(seed)]


def deepest(entry: dict, split: str = "test") -> dict[int, float]:
    """Per seed, the deepest exit's accuracy (%) of a ``self_distillation_*.json`` entry on ``split``."""
    return {s: pct(r[split]["exits"][-1]) for s, r in zip(entry["seeds"], entry["runs"])}


def paired(a: dict[int, float], b: dict[int, float]) -> list[float]:
    """``a − b`` seed by seed (both must hold the same seeds)."""
    assert sorted(a) == sorted(b), f"seeds differ: {sorted(a)} against {sorted(b)}"
    return [a[s] - b[s] for s in sorted(a)]


def point(points: list[dict], setting: str) -> dict:
    """The one point whose setting (settings of merged points are joined by ', ') includes ``setting``."""
    found = [p for p in points if setting in p["setting"].split(", ")]
    assert len(found) == 1, f"{len(found)} points with setting {setting!r}"
    return found[0]


def sd_pairs(pattern: str) -> list[dict]:
    """Every (setting, learning rate) of the ``self_distillation`` files matching ``pattern`` where both the
    plain backbone (``baseline``) and ``default`` ran: their seeds and deepest test accuracies (%), paired."""
    found = []
    for path in sorted(glob.glob(str(RESULTS_DIR / pattern))):
        data = _load(Path(path).name)
        for lr, variants in data["results"].items():
            if "default" in variants and "baseline" in variants:
                d, b = deepest(variants["default"]), deepest(variants["baseline"])
                paired(d, b)  # same seeds
                found.append({"setting": data["setting"], "lr": lr, "seeds": sorted(d),
                              "default": [d[s] for s in sorted(d)], "baseline": [b[s] for s in sorted(d)]})
    assert found, f"no self-distillation results match {pattern!r}"
    return found


def aligned(*runs: list[dict], keys=("input", "batch_size", "scenario")) -> list[tuple[dict, ...]]:
    """The rows of several runs of one benchmark, setting by setting (each run must hold the same settings)."""
    for rows in zip(*runs):
        same(*[tuple(r[k] for k in keys) for r in rows])
    same(*[len(r) for r in runs])
    return list(zip(*runs))


NAMESPACE = {
    "__builtins__": {},
    **{f.__name__: f for f in (J, mean, gmean, sem, binomial_se, pct, same, require, seeds, seed_of, run, deepest,
                               paired, point, sd_pairs, aligned)},
    **{f.__name__: f for f in (abs, all, any, enumerate, float, int, len, list, max, min, range, round, set, sorted,
                               str, sum, tuple, zip)},
}


# ---------------------------------------------------------------------------------------------------
# Reading the table and checking a row.


def section(text: str, heading: str) -> str:
    """The text of the ``## heading`` section, up to the next ``## `` heading."""
    match = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"no '## {heading}' section in RESULTS.md"
    return match.group(1)


def split_row(line: str) -> list[str]:
    line = line.strip()
    assert line.startswith("|") and line.endswith("|"), f"not a table row: {line!r}"
    return [cell.strip() for cell in line[1:-1].split("|")]


def summary_rows(text: str) -> list[dict]:
    """The Summary's table: the first table of the section, one dict per row (cells by column, and the
    row's check comment under ``check``)."""
    lines = section(text, "Summary").splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.lstrip().startswith("|"):
            break
        table.append(line)
    assert split_row(table[0]) == COLUMNS, f"the Summary table's columns are {split_row(table[0])}, not {COLUMNS}"
    assert set(split_row(table[1])[0]) <= set("-: "), "the second line of the table is not its separator"
    rows = []
    for line in table[2:]:
        checks = CHECK.findall(line)
        assert len(checks) == 1, f"a Summary row needs exactly one check comment: {line[:80]!r}"
        cells = split_row(CHECK.sub("", line))
        assert len(cells) == len(COLUMNS), f"{len(cells)} cells in {line[:80]!r}"
        rows.append({**dict(zip(COLUMNS, cells)), "check": checks[0], "line": line})
    return rows


def parse_check(check: str) -> list[tuple[str, str, str]]:
    """``(kind, expression, format)`` per part: kind ``let`` (format: the name), ``figure`` or ``seeds``."""
    parts = []
    for part in (p.strip() for p in check.split(";;")):
        if not part:
            continue
        let = re.fullmatch(r"([A-Za-z_]\w*)\s*=(?!=)\s*(.+)", part, re.DOTALL)
        if let and " => " not in part:
            parts.append(("let", let.group(2), let.group(1)))
            continue
        assert " => " in part, f"a check part is neither NAME = EXPR nor EXPR => FORMAT: {part!r}"
        expression, fmt = (s.strip() for s in part.rsplit(" => ", 1))
        kind = "figure"
        if expression.startswith("seeds:"):
            kind, expression = "seeds", expression[len("seeds:"):].strip()
        parts.append((kind, expression, fmt))
    return parts


def number_spans(cell: str) -> list[tuple[int, int]]:
    """Where the numbers of a cell are (a sign counts only where it does not join a range: ``1.6-2.1``)."""
    return [m.span() for m in re.finditer(r"(?:(?<![\d.])[+-])?(?<![\d.])\d+(?:\.\d+)?", cell)]


def find_value(cell: str, text: str, start: int) -> tuple[int, int] | None:
    """The first place from ``start`` where ``text`` stands in ``cell`` as a whole number."""
    pos = cell.find(text, start)
    while pos >= 0:
        end = pos + len(text)
        before = cell[pos - 1] if pos > 0 else " "
        joins_sign = (text[0] not in "+-" and before in "+-"
                      and not (pos > 1 and cell[pos - 2].isdigit()))  # "-0.07", not the range "1.6-2.1"
        after_digit = end < len(cell) and (cell[end].isdigit()
                                           or (cell[end] == "." and end + 1 < len(cell) and cell[end + 1].isdigit()))
        if not (before.isdigit() or before == "." or joins_sign or after_digit):
            return pos, end
        pos = cell.find(text, pos + 1)
    return None


def check_row(row: dict) -> None:
    """Raises AssertionError unless every number of the row's figure and seeds cells is the one its JSON
    gives, as printed, and every file its checks read is named in its source cell."""
    namespace = dict(NAMESPACE)
    cells = {kind: row[kind].replace("\u2212", "-") for kind in ("figure", "seeds")}
    cursor = {"figure": 0, "seeds": 0}
    covered: dict[str, list[tuple[int, int]]] = {"figure": [], "seeds": []}
    parts = parse_check(row["check"])
    assert any(kind == "figure" for kind, _, _ in parts), f"row {row['what']!r} checks no figure"
    for kind, expression, fmt in parts:
        try:
            value = eval(expression, namespace)  # the expressions are this repository's own text
        except Exception as error:  # pragma: no cover - the message is the point
            raise AssertionError(f"row {row['what']!r}: {expression!r} failed: {error!r}") from error
        if kind == "let":
            namespace[fmt] = value
            continue
        text = fmt.format(value)
        span = find_value(cells[kind], text, cursor[kind])
        assert span, (f"row {row['what']!r}: the {kind} cell should show {text!r} (from {expression!r}) "
                      f"after position {cursor[kind]}: {row[kind]!r}")
        covered[kind].append(span)
        cursor[kind] = span[1]
    for kind, cell in cells.items():
        for start, end in number_spans(cell):
            assert any(a <= start and end <= b for a, b in covered[kind]), \
                f"row {row['what']!r}: {cell[start:end]!r} in its {kind} cell is not checked against a JSON file"
    used = set(JSON_NAME.findall(row["check"]))
    named = set(JSON_NAME.findall(row["source"]))
    assert used == named, f"row {row['what']!r}: its checks read {sorted(used)}, its source names {sorted(named)}"
    for name in named:
        assert glob.glob(str(RESULTS_DIR / name)), f"row {row['what']!r}: no file results/{name}"


# ---------------------------------------------------------------------------------------------------


TEXT = RESULTS_MD.read_text()
ROWS = summary_rows(TEXT)


def test_the_summary_starts_with_its_table():
    summary = section(TEXT, "Summary")
    first = next(line for line in summary.splitlines() if line.strip())
    assert first.startswith("|"), "the Summary must open with its table"
    assert len(ROWS) >= 8


@pytest.mark.parametrize("row", ROWS, ids=[r["what"][:40] for r in ROWS])
def test_summary_row_matches_its_json(row):
    check_row(row)


@pytest.mark.parametrize("row", ROWS, ids=[r["what"][:40] for r in ROWS])
def test_summary_row_names_a_section_that_exists(row):
    numbers = re.findall(r"§(\d+)", row["section"])
    assert numbers, f"row {row['what']!r} names no section"
    for n in numbers:
        assert re.search(rf"^## {n}\. ", TEXT, re.MULTILINE), f"row {row['what']!r}: no section {n} in RESULTS.md"


def test_an_edited_digit_fails():
    """Every digit of every checked cell matters: changing any one of them makes its row fail."""
    for row in ROWS:
        for kind in ("figure", "seeds"):
            for i, char in enumerate(row[kind]):
                if not char.isdigit():
                    continue
                edited = dict(row, **{kind: row[kind][:i] + str((int(char) + 1) % 10) + row[kind][i + 1:]})
                with pytest.raises(AssertionError):
                    check_row(edited)


def test_the_summary_does_not_quote_the_archive():
    """Superseded runs live in RESULTS_ARCHIVE.md; the Summary quotes none of the files it cites."""
    archived = set(JSON_NAME.findall(ARCHIVE_MD.read_text()))
    quoted = set(JSON_NAME.findall(section(TEXT, "Summary")))
    assert archived, "RESULTS_ARCHIVE.md cites no JSON file"
    assert not quoted & archived, f"the Summary quotes archived runs: {sorted(quoted & archived)}"
