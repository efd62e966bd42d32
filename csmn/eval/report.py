"""The evaluation report: ``report.json`` (everything), ``report.md`` (the tables a person
reads), ``report.html`` (the same, self-contained: example thumbnails embedded as small base64
JPEGs) and ``predictions.parquet`` (every method's prediction for every scored post).

Example predictions are marked as in the paper's Figure 4: a predicted word that is in the
ground truth is bold, one that is in the post's context memory is highlighted (italic in the
markdown) -- the context words the prediction used.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import logging
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from csmn.data import schemas, storage

log = logging.getLogger(__name__)
THUMBNAIL_PIXELS = 96
CONTEXT_SHOWN = 12

# The paper's numbers (Instagram, split by users; hashtag F1 also by posts), for scale only:
# a synthetic archive is not Instagram.
PAPER_RESULTS: dict[str, dict[str, dict[str, float]]] = {
    "post": {
        "CSMN-P5": {
            "bleu_1": 0.171,
            "bleu_4": 0.013,
            "meteor": 0.064,
            "cider": 0.214,
            "rouge_l": 0.177,
        },
        "1NN-Im": {
            "bleu_1": 0.071,
            "bleu_4": 0.004,
            "meteor": 0.032,
            "cider": 0.059,
            "rouge_l": 0.069,
        },
        "1NN-Usr": {
            "bleu_1": 0.063,
            "bleu_4": 0.000,
            "meteor": 0.028,
            "cider": 0.025,
            "rouge_l": 0.059,
        },
        "1NN-UsrIm": {
            "bleu_1": 0.106,
            "bleu_4": 0.005,
            "meteor": 0.046,
            "cider": 0.084,
            "rouge_l": 0.104,
        },
    },
    "hashtag": {
        "CSMN-P5": {"f1": 0.230, "f1_by_posts": 0.390},
        "1NN-Im": {"f1": 0.049, "f1_by_posts": 0.110},
        "1NN-Usr": {"f1": 0.054, "f1_by_posts": 0.173},
        "1NN-UsrIm": {"f1": 0.109, "f1_by_posts": 0.380},
    },
}
COLUMNS = {
    "hashtag": ["f1", "precision", "recall", "context_share"],
    "post": [
        "bleu_1",
        "bleu_2",
        "bleu_3",
        "bleu_4",
        "meteor",
        "cider",
        "rouge_l",
        "context_share",
    ],
}
PER_USER_COLUMNS = {
    "hashtag": ["n_posts", "f1", "precision", "recall", "context_share"],
    "post": ["n_posts", "bleu_1", "rouge_l", "context_share"],
}


def example_rows(
    post_ids: Sequence[str],
    user_ids: Sequence[str],
    truths: Sequence[str],
    contexts: Sequence[Sequence[str]],
    predictions: dict[str, list[list[str]]],
    count: int,
    seed: int,
    images: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """``count`` posts chosen by a seeded hash of their id (stable across runs and methods),
    each with its truth, the first context words, its image URI and every method's prediction
    with the context words it used (predicted words found in the whole context memory)."""

    def rank(post_id: str) -> bytes:
        return hashlib.blake2b(f"{seed}:{post_id}".encode(), digest_size=8).digest()

    chosen = sorted(range(len(post_ids)), key=lambda i: rank(post_ids[i]))[:count]
    return [
        {
            "post_id": post_ids[i],
            "user_id": user_ids[i],
            "truth": truths[i],
            "context_words": list(contexts[i][:CONTEXT_SHOWN]),
            "context_size": len(contexts[i]),
            "image": images[i] if images is not None else None,
            "predictions": {m: " ".join(p[i]) for m, p in predictions.items()},
            "context_used": {
                m: [w for w in dict.fromkeys(p[i]) if w in set(contexts[i])]
                for m, p in predictions.items()
            },
        }
        for i in chosen
    ]


def _marked_markdown(text: str, truth: set[str], context: set[str]) -> str:
    """Figure 4's marks in markdown: **in the truth**, _in the context memory_."""
    words = []
    for word in text.split():
        shown = word.replace("*", "\\*").replace("_", "\\_")
        if word in context:
            shown = f"_{shown}_"
        if word in truth:
            shown = f"**{shown}**"
        words.append(shown)
    return " ".join(words)


def build_report(
    config: dict[str, Any],
    out: str,
    model: dict[str, Any],
    counts: dict[str, int],
    results: dict[str, dict[str, Any]],
    per_user: dict[str, list[dict[str, Any]]],
    examples: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "task": config["task"],
        "split": config["split"],
        "out": out,
        "config": config,
        "model": model,
        "counts": counts,
        "results": results,
        "per_user": per_user,
        "examples": examples,
        "paper_results": PAPER_RESULTS[config["task"]],
        "notes": [
            "CIDEr takes its document frequencies from the evaluated split: it is reported "
            "per split only, never per user or post.",
            "Emoji are scored as their escape text (\\U0001f60d), as the authors did.",
            "context_share: share of predicted tokens found in the post's context words.",
        ],
    }


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value).replace("|", "\\|")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


def render_markdown(report: dict[str, Any], users_shown: int = 10) -> str:
    task, counts = report["task"], report["counts"]
    columns = COLUMNS[task]
    lines = [
        f"# CSMN evaluation: {task}, split {report['split']}",
        "",
        f"Data: `{report['config']['data']}`. Model: `{report['model'].get('uri') or 'none'}`"
        + (f" (epoch {report['model'].get('epoch')})" if report["model"] else "")
        + ".",
        f"Posts: {counts['examples']} in the split, {counts['scored']} scored, "
        f"{counts['skipped_no_features']} skipped (no image features).",
        "",
        "## Results",
        "",
    ]
    lines += _table(
        ["method", *columns],
        [[m, *(r.get(c) for c in columns)] for m, r in report["results"].items()],
    )
    paper = report["paper_results"]
    paper_columns = sorted({c for r in paper.values() for c in r})
    lines += [
        "",
        "The paper's numbers on Instagram, for scale (not comparable to synthetic data):",
        "",
    ]
    lines += _table(
        ["method", *paper_columns],
        [[m, *(r.get(c) for c in paper_columns)] for m, r in paper.items()],
    )
    user_columns = PER_USER_COLUMNS[task]
    for method, users in report["per_user"].items():
        lines += ["", f"## Per user: {method} ({len(users)} users, most posts first)", ""]
        lines += _table(
            ["user", *user_columns],
            [[u["user_id"], *(u.get(c) for c in user_columns)] for u in users[:users_shown]],
        )
    lines += ["", "## Example predictions", ""]
    for example in report["examples"]:
        truth = set(example["truth"].split())
        used = example.get("context_used", {})
        lines += [
            f"**{example['post_id']}** (user {example['user_id']})",
            "",
            f"- truth: {example['truth']}",
            f"- context (first {len(example['context_words'])} of "
            f"{example.get('context_size', len(example['context_words']))}): "
            f"{' '.join(example['context_words'])}",
        ]
        for method, text in example["predictions"].items():
            marked = _marked_markdown(text, truth, set(used.get(method, [])))
            lines.append(f"- {method}: {marked or '(empty)'}")
        lines.append("")
    lines += [
        "Marks as in the paper's Figure 4: **bold** = in the ground truth, _italic_ = a word "
        "of the user's context memory (the context words the prediction used).",
        "",
    ]
    lines += ["## Notes", ""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ HTML


def thumbnail_data_uri(image_uri: str | None, pixels: int = THUMBNAIL_PIXELS) -> str | None:
    """A small JPEG of the image as a ``data:`` URI (read through csmn.data.storage, so local or
    s3://); None when it cannot be read or decoded: the report says so instead."""
    if not image_uri:
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(storage.read_bytes(image_uri))) as image:
            image = image.convert("RGB")
            image.thumbnail((pixels, pixels))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=75)
    except Exception as error:  # a broken image never breaks the report
        log.warning("no thumbnail for %s: %s", image_uri, error)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}
.example{display:flex;gap:1em;border-top:1px solid #ddd;padding:.8em 0}
.example img{width:96px;height:96px;object-fit:cover;border:1px solid #aaa}
.noimg{width:96px;height:96px;background:#eee;font-size:11px;display:flex;align-items:center}
.hit{font-weight:bold}.ctx{background:#ffe08a}.muted{color:#777;font-size:90%}
"""


def _html_table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _marked_html(text: str, truth: set[str], context: set[str]) -> str:
    words = []
    for word in text.split():
        classes = [c for c, on in (("hit", word in truth), ("ctx", word in context)) if on]
        escaped = html.escape(word)
        words.append(f'<span class="{" ".join(classes)}">{escaped}</span>' if classes
                     else escaped)
    return " ".join(words) or '<span class="muted">(empty)</span>'


def render_html(report: dict[str, Any], users_shown: int = 10) -> str:
    """One self-contained page: the tables of the markdown and the example predictions with
    their thumbnails, marked as in the paper's Figure 4."""
    task, counts, model = report["task"], report["counts"], report["model"]
    columns = COLUMNS[task]
    title = f"CSMN evaluation: {task}, split {report['split']}"
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
        f"<p>Data: <code>{html.escape(str(report['config']['data']))}</code>. Model: "
        f"<code>{html.escape(str(model.get('uri') or 'none'))}</code>"
        + (f" (epoch {html.escape(str(model.get('epoch')))})" if model else "")
        + f". Posts: {counts['examples']} in the split, {counts['scored']} scored, "
        f"{counts['skipped_no_features']} skipped (no image features).</p>",
        "<h2>Results</h2>",
        _html_table(["method", *columns],
                    [[m, *(r.get(c) for c in columns)] for m, r in report["results"].items()]),
    ]
    paper = report["paper_results"]
    paper_columns = sorted({c for r in paper.values() for c in r})
    parts += [
        "<p class='muted'>The paper's numbers on Instagram, for scale (not comparable to "
        "synthetic data):</p>",
        _html_table(["method", *paper_columns],
                    [[m, *(r.get(c) for c in paper_columns)] for m, r in paper.items()]),
        "<h2>Example predictions</h2>",
        "<p class='muted'>As in the paper's Figure 4: <span class='hit'>bold</span> = in the "
        "ground truth, <span class='ctx'>highlighted</span> = a word of the user's context "
        "memory.</p>",
    ]
    for example in report["examples"]:
        thumbnail = thumbnail_data_uri(example.get("image"))
        picture = (f"<img src='{thumbnail}' alt='{html.escape(example['post_id'])}'>"
                   if thumbnail else "<div class='noimg'>image unavailable</div>")
        truth = set(example["truth"].split())
        used = example.get("context_used", {})
        lines = [
            f"<b>{html.escape(example['post_id'])}</b> "
            f"<span class='muted'>user {html.escape(example['user_id'])}</span>",
            f"GT: {html.escape(example['truth'])}",
            "<span class='muted'>context: " + html.escape(" ".join(example["context_words"]))
            + (" ..." if example.get("context_size", 0) > len(example["context_words"]) else "")
            + "</span>",
        ]
        for method, text in example["predictions"].items():
            context_used = used.get(method, [])
            lines.append(
                f"{html.escape(method)}: {_marked_html(text, truth, set(context_used))}"
                + (f" <span class='muted'>(context used: {html.escape(' '.join(context_used))})"
                   "</span>" if context_used else "")
            )
        parts.append(f"<div class='example'>{picture}<div>{'<br>'.join(lines)}</div></div>")
    user_columns = PER_USER_COLUMNS[task]
    for method, users in report["per_user"].items():
        parts.append(f"<h2>Per user: {html.escape(method)} ({len(users)} users, most posts "
                     "first)</h2>")
        parts.append(_html_table(
            ["user", *user_columns],
            [[u["user_id"], *(u.get(c) for c in user_columns)] for u in users[:users_shown]]))
    parts.append("<h2>Notes</h2><ul>" + "".join(
        f"<li>{html.escape(n)}</li>" for n in report["notes"]) + "</ul></body></html>")
    return "\n".join(parts) + "\n"


def predictions_table(
    post_ids: Sequence[str], user_ids: Sequence[str], predictions: dict[str, list[list[str]]]
) -> pa.Table:
    rows = {"post_id": [], "user_id": [], "method": [], "prediction": []}
    for method, predicted in predictions.items():
        rows["post_id"] += list(post_ids)
        rows["user_id"] += list(user_ids)
        rows["method"] += [method] * len(post_ids)
        rows["prediction"] += [" ".join(p) for p in predicted]
    return schemas.conform(rows, "evaluation_prediction")


def write_report(
    out: str,
    report: dict[str, Any],
    post_ids: Sequence[str],
    user_ids: Sequence[str],
    predictions: dict[str, list[list[str]]],
    users_shown: int = 10,
) -> None:
    storage.makedirs(out)
    storage.write_parquet(
        storage.join(out, "predictions.parquet"), predictions_table(post_ids, user_ids, predictions)
    )
    storage.write_text(storage.join(out, "report.md"), render_markdown(report, users_shown))
    storage.write_text(storage.join(out, "report.html"), render_html(report, users_shown))
    # written last: a folder with report.json is a complete report
    storage.write_json(storage.join(out, "report.json"), report)
