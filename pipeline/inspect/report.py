"""The inspector's ``report.html``: one self-contained file (pictures as inline PNG data, the
records as inline JSON, a little inline JavaScript; nothing fetched), readable from disk.

Click a query row or a ground-truth row: the query's row is highlighted, and the picture shows its
box at every decoder layer and its sampling points. ``report.html?selftest`` clicks the first
ground-truth row (else the first query) on load and writes what happened, with any JavaScript
error, into ``<pre id="selftest">`` (what a headless browser test reads back).
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from pipeline.inspect.verdicts import VERDICTS

STYLE = """
body { font: 14px system-ui, sans-serif; margin: 16px; background: #fafafa; color: #222; }
section.image { background: #fff; border: 1px solid #ddd; padding: 12px; margin-bottom: 20px; }
.layout { display: flex; gap: 16px; align-items: flex-start; flex-wrap: wrap; }
.view img { max-width: 640px; border: 1px solid #ccc; image-rendering: auto; }
table { border-collapse: collapse; margin: 6px 0; }
td, th { border: 1px solid #ddd; padding: 2px 6px; text-align: right; }
th { background: #eee; }
tr.gt-row, tr.query-row { cursor: pointer; }
tr.selected { background: #ffe08a; outline: 2px solid #e08a00; }
.verdict-found { color: #1a7f37; } .verdict-low_score { color: #9a6700; }
.verdict-mislocalised { color: #bc4c00; } .verdict-duplicate { color: #8250df; }
.verdict-missed { color: #cf222e; font-weight: bold; }
.legend span { margin-right: 12px; }
"""

SCRIPT = """
(function () {
  var errors = [];
  window.onerror = function (message) { errors.push(String(message)); };
  function pictureOf(image, query) {
    var row = document.getElementById('q-' + image + '-' + query);
    return row ? row.getAttribute('data-picture') : null;
  }
  function select(image, query) {
    var rows = document.querySelectorAll('[data-image="' + image + '"]');
    for (var i = 0; i < rows.length; i++) {
      var hit = String(rows[i].getAttribute('data-query')) === String(query);
      rows[i].classList.toggle('selected', hit);
    }
    var view = document.getElementById('view-' + image);
    var picture = pictureOf(image, query);
    if (view && picture) { view.src = PICTURES[picture]; view.setAttribute('data-showing', 'q' + query); }
    document.body.setAttribute('data-selected', image + ':' + query);
  }
  function onClick(event) {
    var row = event.currentTarget;
    var query = row.getAttribute('data-query');
    if (query !== null && query !== '') { select(row.getAttribute('data-image'), query); }
  }
  function selftest() {
    var row = document.querySelector('tr.gt-row[data-query]') || document.querySelector('tr.query-row');
    var result = {clicked: null, highlighted: [], showing: null, gt_rows: 0, verdicts: 0, errors: errors};
    result.gt_rows = document.querySelectorAll('tr.gt-row').length;
    result.verdicts = document.querySelectorAll('tr.gt-row td.verdict').length;
    if (row) {
      row.click();
      result.clicked = row.id;
      var picked = document.querySelectorAll('tr.query-row.selected');
      for (var i = 0; i < picked.length; i++) { result.highlighted.push(picked[i].id); }
      var view = document.getElementById('view-' + row.getAttribute('data-image'));
      result.showing = view ? view.getAttribute('data-showing') : null;
      result.query = row.getAttribute('data-query');
    }
    var out = document.createElement('pre');
    out.id = 'selftest';
    out.textContent = JSON.stringify(result);
    document.body.appendChild(out);
  }
  document.addEventListener('DOMContentLoaded', function () {
    var rows = document.querySelectorAll('tr.gt-row, tr.query-row');
    for (var i = 0; i < rows.length; i++) { rows[i].addEventListener('click', onClick); }
    if (window.location.search.indexOf('selftest') >= 0) { selftest(); }
  });
})();
"""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _cell(value) -> str:
    if value is None:
        return "<td>-</td>"
    if isinstance(value, float):
        return f"<td>{value:.3f}</td>"
    return f"<td>{html.escape(str(value))}</td>"


def _gt_table(index: int, record: dict) -> str:
    head = ("<tr><th>object</th><th>class</th><th>matched query</th><th>cost class</th>"
            "<th>cost L1</th><th>cost GIoU</th><th>cost total</th><th>score</th><th>rank</th>"
            "<th>IoU</th><th>best-IoU query</th><th>best IoU</th><th>its score</th><th>verdict</th></tr>")
    rows = []
    for row in record["ground_truth"]:
        cost, query = row["cost"], row["matched_query"]
        cells = [_cell(f"G{row['object']}"), _cell(row["name"]), _cell(query),
                 *(_cell(cost.get(k)) for k in ("class", "bbox", "giou", "total")),
                 _cell(row["matched_score"]), _cell(row["matched_rank"]), _cell(row["matched_iou"]),
                 _cell(row["best_query"]), _cell(row["best_iou"]), _cell(row["best_score"])]
        verdict = html.escape(row["verdict"])
        rows.append(f'<tr class="gt-row" id="g-{index}-{row["object"]}" data-image="{index}" '
                    f'data-query="{"" if query is None else query}">{"".join(cells)}'
                    f'<td class="verdict verdict-{verdict}">{verdict}</td></tr>')
    if not rows:
        return "<p>No ground truth for this image.</p>"
    return f'<table class="gt">{head}{"".join(rows)}</table>'


def _query_table(index: int, record: dict) -> str:
    head = ("<tr><th>query</th><th>rank</th><th>score</th><th>classes</th><th>box (x0, y0, x1, y1)</th>"
            "<th>layers</th><th>points / layer</th></tr>")
    rows = []
    for query in sorted(record["queries"], key=lambda q: q["rank"]):
        classes = ", ".join(f"{name} {p:.2f}" for name, p in query["classes"])
        box = ", ".join(f"{v:.0f}" for v in query["box"])
        points = len(query["points"][-1]) if query["points"] else 0
        cells = [_cell(f"q{query['query']}"), _cell(query["rank"]), _cell(query["score"]),
                 _cell(classes), _cell(box), _cell(len(query["layer_boxes"])), _cell(points)]
        rows.append(f'<tr class="query-row" id="q-{index}-{query["query"]}" data-image="{index}" '
                    f'data-query="{query["query"]}" data-picture="{html.escape(query["picture"])}">'
                    f'{"".join(cells)}</tr>')
    return f'<table class="queries">{head}{"".join(rows)}</table>'


def _section(index: int, record: dict, pictures: dict[str, str]) -> str:
    counts = " ".join(f"{k}: {v}" for k, v in record["verdicts"].items())
    overview = record["overview"]
    return (f'<section class="image" id="image-{index}"><h2>{html.escape(record["name"])} '
            f'({record["width"]}x{record["height"]})</h2><p>{html.escape(counts)}</p>'
            f'<div class="layout"><div class="view"><img id="view-{index}" alt="{html.escape(record["name"])}" '
            f'data-showing="overview" src="{pictures[overview]}"></div><div>'
            f'<h3>Ground truth</h3>{_gt_table(index, record)}'
            f'<h3>Queries</h3>{_query_table(index, record)}</div></div></section>')


def _legend() -> str:
    return ('<p class="legend"><span style="color:#28dc5a">&#9632; ground truth</span>'
            '<span style="color:#ff5a28">&#9632; query (final box, thick)</span>'
            '<span>earlier decoder layers: blue &rarr; orange</span>'
            '<span>sampling points: circle area = attention weight; level 0 red, 1 cyan, 2 yellow, '
            '3 violet</span></p>')


def write_report(summary: dict, base: Path, path: Path) -> Path:
    """report.html from inspect.json's ``summary``; picture paths are relative to ``base``."""
    paths = {r["overview"] for r in summary["images"]}
    paths |= {q["picture"] for r in summary["images"] for q in r["queries"]}
    pictures = {p: _data_uri(base / p) for p in sorted(paths)}
    totals = " | ".join(f"{k}: {summary['verdicts'][k]}" for k in VERDICTS)
    data = json.dumps(summary).replace("</", "<\\/")
    body = "".join(_section(i, r, pictures) for i, r in enumerate(summary["images"]))
    page = (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>detrforge inspect</title>'
            f"<style>{STYLE}</style></head><body><h1>What each query saw</h1>"
            f'<p>score threshold {summary["score_threshold"]}; ground-truth objects: {totals}</p>'
            f"{_legend()}{body}"
            f'<script type="application/json" id="inspect-data">{data}</script>'
            f"<script>var PICTURES = {json.dumps(pictures)};{SCRIPT}</script></body></html>")
    path.write_text(page)
    return path
