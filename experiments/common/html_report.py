"""A self-contained HTML page of attribution results: per query its top training sequences with each
token coloured by its contribution to the score (as in Grosse et al. 2023's token-wise figures: red
positive, blue negative, opacity ∝ |contribution| / the sequence's largest), then the heavy-tail
curve of the scores and the run's settings. No script and no external file (the figure is inline
SVG), so the page opens anywhere and renders the same in a headless browser.
"""
from __future__ import annotations

import html
import io
from typing import Sequence

import numpy as np

from experiments.common import plots

__all__ = ["token_spans", "render"]

_STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 70em;
       color: #222; line-height: 1.45; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 0.25em 0.6em; vertical-align: top; text-align: left; }
th { background: #f4f4f4; }
td.num, td.id { white-space: nowrap; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.seq { font-family: Menlo, Consolas, monospace; font-size: 0.9em; white-space: pre-wrap; }
.tok { border-radius: 2px; }
.prompt { color: #555; } .completion { font-weight: bold; background: #fff2b3; }
.legend span { padding: 0 0.4em; }
.settings td:first-child { font-family: monospace; }
"""


def _colour(value: float, scale: float) -> str:
    alpha = 0.0 if scale <= 0 else min(1.0, abs(value) / scale) * 0.85
    rgb = "220,40,40" if value > 0 else "40,90,220"
    return f"rgba({rgb},{alpha:.3f})"


def token_spans(pieces: Sequence[str], contributions: Sequence[float] | None) -> str:
    """HTML of a sequence, one <span> per token with its contribution as colour and tooltip (a token
    without text of its own adds its contribution to the next one that has text)."""
    if contributions is None:
        return html.escape("".join(pieces))
    values = np.asarray(contributions, np.float64)
    scale = float(np.max(np.abs(values))) if values.size else 0.0
    out, carried = [], 0.0
    for piece, value in zip(pieces, values):
        if not piece:  # a token with no text of its own (part of a later token's character): carried on
            carried += value
            continue
        value, carried = value + carried, 0.0
        out.append(f'<span class="tok" style="background:{_colour(value, scale)}" '
                   f'title="{value:+.4g}">{html.escape(piece)}</span>')
    return "".join(out)


def _svg_heavy_tail(scores: np.ndarray) -> str:
    """Inline SVG: mean over queries of the sorted |score| vs rank, log-log."""
    finite = [np.sort(np.abs(s[np.isfinite(s)]))[::-1] for s in scores]
    finite = [s for s in finite if s.size]
    fig, ax = plots.figure(size=(5.5, 3.2))
    if finite:
        n = min(len(s) for s in finite)
        curve = np.mean([s[:n] for s in finite], axis=0)
        positive = curve > 0
        ranks = np.arange(1, n + 1)
        for k, s in enumerate(finite[:20]):
            keep = s > 0
            ax.plot(np.arange(1, len(s) + 1)[keep], s[keep], color="C3", alpha=0.15, linewidth=0.8,
                    label="first 20 queries" if k == 0 else None)
        ax.plot(ranks[positive], curve[positive], color="0.1", linewidth=1.8, label="mean over queries")
        ax.set_xscale("log")
        ax.set_yscale("log")
        plots.legend(ax)
    ax.set_xlabel("rank of training sequence")
    ax.set_ylabel("|score|")
    ax.set_title("Heavy tail of the scores")
    buffer = io.StringIO()
    plots.save_to(fig, buffer, format="svg")
    svg = buffer.getvalue()
    return svg[svg.index("<svg"):]


def render(*, title: str, settings: dict, queries: list[dict], scores: np.ndarray, notes: Sequence[str] = ()) -> str:
    """The page. `queries`: per query {"id", "prompt_html", "hits": [{"rank", "id", "score", "html"}]}.
    `scores`: (Q, N) (NaN where a pair was not scored), for the heavy-tail curve."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    for note in notes:
        parts.append(f"<p>{html.escape(note)}</p>")
    parts.append(f"<p>{len(queries)} queries, each with its top {max((len(q['hits']) for q in queries), default=0)} "
                 "training sequences. <a href='#distribution'>Score distribution</a> · "
                 "<a href='#settings'>Settings</a></p>")
    parts.append("<p class='legend'>Token colours: <span style='background:rgba(220,40,40,0.6)'>positive "
                 "contribution</span> <span style='background:rgba(40,90,220,0.6)'>negative contribution</span> "
                 "(opacity ∝ |contribution| / the sequence's largest; hover a token for its value).</p>")
    for q in queries:
        parts.append(f"<h2 id='q-{html.escape(str(q['id']))}'>Query {html.escape(str(q['id']))}</h2>")
        parts.append(f"<p class='seq'>{q['prompt_html']}</p>")
        parts.append("<table><tr><th>rank</th><th>training id</th><th>score</th><th>sequence</th></tr>")
        for hit in q["hits"]:
            parts.append(f"<tr><td class='num'>{hit['rank']}</td><td class='id'>{html.escape(str(hit['id']))}</td>"
                         f"<td class='num'>{hit['score']:+.4g}</td><td class='seq'>{hit['html']}</td></tr>")
        parts.append("</table>")
    parts.append("<h2 id='distribution'>Score distribution</h2>" + _svg_heavy_tail(np.asarray(scores)))
    parts.append("<h2 id='settings'>Settings</h2><table class='settings'>")
    for key, value in settings.items():
        parts.append(f"<tr><td>{html.escape(str(key))}</td><td>{html.escape(str(value))}</td></tr>")
    parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
