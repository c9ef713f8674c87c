"""results.md and results.json: a '|' or line break in a task name keeps the table's columns,
and NaN/inf values are written as JSON null (strict readers refuse NaN and Infinity)."""

import json

from raylm.eval.results import markdown_table, rows_from_metrics, write_results


def _cells(line: str) -> list[str]:
    """A GFM table row's cells: split on '|' not escaped by a backslash."""
    cells, cur, i = [], "", 0
    body = line.strip()[1:-1]
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            cur += body[i:i + 2]
            i += 2
            continue
        if body[i] == "|":
            cells.append(cur.strip())
            cur = ""
        else:
            cur += body[i]
        i += 1
    return cells + [cur.strip()]


def test_pipe_and_newline_in_a_task_name_keep_five_columns():
    rows = rows_from_metrics("corpus:a|b\nc.txt", {"acc": 0.5, "acc_stderr": 0.01, "n": 10}, {})
    table = markdown_table(rows).splitlines()
    assert len(table) == 3  # header, rule, one row: the line break did not end the row early
    cells = _cells(table[2])
    assert len(cells) == 5, table[2]
    assert cells[0] == "corpus:a\\|b c.txt" and cells[1:] == ["acc", "0.5000", "0.0100", "10"]


def test_non_finite_values_are_strict_json_nulls(tmp_path):
    rows = rows_from_metrics("t", {"ppl": float("inf"), "acc": float("nan"), "acc_stderr": float("nan"), "n": 1}, {})
    paths = write_results(str(tmp_path), rows, {"checkpoint": "ckpt-1"})
    text = open(paths["json"]).read()

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    doc = json.loads(text, parse_constant=refuse)  # what jq or JavaScript would accept
    got = {r["metric"]: (r["value"], r["stderr"]) for r in doc["results"]}
    assert got == {"ppl": (None, None), "acc": (None, None)}
    md = open(paths["markdown"]).read()
    assert "| t | ppl | inf |" in md and "| t | acc | nan |" in md  # the table still says which
