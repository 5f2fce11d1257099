"""``gputel job --html``: one self-contained page about one allocation, to attach to a ticket.

Everything is inside the file: the style sheet, the timeline figure as inline SVG, no script,
no font, image or style fetched from anywhere, so it opens the same offline, in a mail client or
in a ticket system that strips outside references. Every text from the records (commands, users,
ids) is escaped.
"""

from __future__ import annotations

from html import escape
from typing import Any

from gputel import __version__
from gputel.analysis import job_text
from gputel.analysis.job import Job
from gputel.formats import UNKNOWN, iso_utc_ms

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fff; }
h1 { font-size: 1.4em; margin: 0 0 .4em; } h2 { font-size: 1.1em; margin: 1.2em 0 .4em; }
table { border-collapse: collapse; margin: .3em 0; }
th, td { border: 1px solid #ccc; padding: .2em .6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; font-weight: 600; }
.verdict li { font-weight: 600; } .muted { color: #777; }
svg { max-width: 100%; height: auto; }
"""


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _pairs(pairs: list[tuple[str, str]]) -> str:
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in pairs)
    return f"<table>{rows}</table>"


def page(job: Job, figure_svg: str | None) -> str:
    """The page; ``figure_svg`` is an inline ``<svg>`` element (None: no plot, said why)."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>gputel job {escape(job.id)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>Job {escape(job.id)}</h1>",
        _pairs(job_text.headline(job)),
        "<h2>Verdict</h2>",
        '<ul class="verdict">'
        + "".join(f"<li>{escape(v)}</li>" for v in job.verdict or ["no recorded rows"])
        + "</ul>",
        "<h2>Timeline</h2>",
        figure_svg
        if figure_svg
        else '<p class="muted">no plot (no recorded rows, or matplotlib missing)</p>',
    ]
    if job.per_gpu:
        labels = [label for label, _ in job_text.gpu_lines(job.per_gpu[0])]
        head = ["GPU", *labels]
        rows = []
        for g in job.per_gpu:
            name = f"{g['gpu']} {g.get('name') or ''} ({g.get('node') or UNKNOWN})".strip()
            rows.append([name, *(v for _, v in job_text.gpu_lines(g))])
        parts += ["<h2>Per GPU</h2>", _table(head, rows)]
    parts.append(f"<h2>Processes ({len(job.processes)})</h2>")
    if job.processes:
        parts.append(
            _table(
                ["GPU", "pid", "user", "job", "command", "peak MiB", "SM %", "first", "last"],
                [
                    [
                        str(p["gpu"]),
                        str(p["pid"]),
                        p["user"],
                        p["job"],
                        p["command"],
                        job_text.num(p.get("memory_peak_mib"), 0),
                        job_text.num(p.get("sm_util_mean_pct")),
                        p["first"],
                        p["last"],
                    ]
                    for p in job.processes
                ],
            )
        )
    parts.append(f"<h2>GPU events ({len(job.events)})</h2>")
    if job.events:
        parts.append(
            _table(
                ["time (UTC)", "node", "GPU", "event", "Xid", "detail"],
                [
                    [
                        e["timestamp"],
                        e["node"],
                        str(e["gpu"]),
                        e["event"],
                        e["xid"] or "",
                        e["detail"],
                    ]
                    for e in job.events
                ],
            )
        )
    for source, figures in sorted(job.sources.items()):
        parts += [
            f"<h2>{escape(source)}</h2>",
            _pairs([(str(k), _text(v)) for k, v in figures.items()]),
        ]
    parts.append(
        f'<p class="muted">gputel {escape(__version__)}, written {iso_utc_ms()}</p></body></html>'
    )
    return "\n".join(parts) + "\n"


def _text(value: Any) -> str:
    return "" if value is None else str(value)
