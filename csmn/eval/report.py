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
import re
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from csmn.data import layout, schemas, storage

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


# Markdown's inline punctuation, escaped with a backslash in text that came from the data
# (ids, captions, context words), so that it renders as the characters it is: no link, image,
# emphasis, code or table cell made by a post; "<" and "&" become entities, so no HTML tag.
# (Block syntax needs a line start, and such text never starts a line: newlines are folded.)
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~])")


def md_text(value: Any) -> str:
    """``value`` as inert markdown text on one line."""
    text = " ".join(str(value).split())
    return _MD_SPECIAL.sub(r"\\\1", text.replace("&", "&amp;").replace("<", "&lt;"))


def _marked_markdown(text: str, truth: set[str], context: set[str]) -> str:
    """Figure 4's marks in markdown: **in the truth**, _in the context memory_."""
    words = []
    for word in text.split():
        shown = md_text(word)
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
            "Emoji are scored as their escape text, as the authors did, but one token each "
            "and without the backslash (u0001f60d; docs/method.md).",
            "context_share: share of predicted tokens found in the post's context words.",
        ],
    }


def _cell(value: Any) -> str:
    """A markdown table's cell: text escaped for markdown."""
    plain = _plain_cell(value)
    return plain if value is None or isinstance(value, float) else md_text(value)


def _plain_cell(value: Any) -> str:
    """A cell as text on one line (an HTML table escapes it for HTML)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return " ".join(str(value).split())


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
        f"Data: {md_text(report['config']['data'])}. Model: "
        f"{md_text(report['model'].get('uri') or 'none')}"
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
            f"**{md_text(example['post_id'])}** (user {md_text(example['user_id'])})",
            "",
            f"- truth: {md_text(example['truth'])}",
            f"- context (first {len(example['context_words'])} of "
            f"{example.get('context_size', len(example['context_words']))}): "
            f"{md_text(' '.join(example['context_words']))}",
        ]
        for method, text in example["predictions"].items():
            marked = _marked_markdown(text, truth, set(used.get(method, [])))
            lines.append(f"- {md_text(method)}: {marked or '(empty)'}")
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
.chart{max-width:100%;border:1px solid #eee;margin:.5em 0}
"""


def _html_table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_plain_cell(v))}</td>" for v in row) + "</tr>"
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
    """One self-contained page: the tables of the markdown, a chart of the methods beside the
    paper's and of the per-user spread, and the example predictions with their thumbnails,
    marked as in the paper's Figure 4."""
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
    ]
    variant = (report.get("model") or {}).get("variant")
    section = {"task": task, "results": report["results"], "title": title,
               "by_posts": layout.is_by_posts(report["split"]), "variant": variant}
    charts = [("methods", methods_bar_png([section])),
              ("per user", per_user_histogram_png(report["per_user"], PAPER_COLUMNS[task][0],
                                                  title, variant))]
    parts += [f"<img class='chart' alt='{alt}' src='{uri}'>" for alt, uri in charts if uri]
    parts += [
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


# ------------------------------------------------------------------------------ demo report
#
# One page for a whole demo run: every task's table beside the paper's, the training curves
# read back from the MLflow runs, charts of the methods and of the per-user spread, and a
# gallery with the attention split of every decoding step. Charts are matplotlib PNGs embedded
# as data URIs, images too: the page is one file that opens anywhere, offline.

MODEL_METHOD = "csmn"  # the model's key among an evaluation's methods
METHOD_NAMES = {MODEL_METHOD: "CSMN-P5", "1nn-im": "1NN-Im", "1nn-usr": "1NN-Usr",
                "1nn-usrim": "1NN-UsrIm"}
# The paper's columns per task (Tables 2 and 3); hashtags split by posts are Table 3's right
# column, ``f1_by_posts``.
PAPER_COLUMNS = {"post": ["bleu_1", "bleu_4", "meteor", "cider", "rouge_l"], "hashtag": ["f1"]}
MEMORY_TYPES = ("image", "context", "output")
MLFLOW_UI = "http://127.0.0.1:5000"


def method_name(method: str, variant: str | None = None) -> str:
    """The paper's name of a method; the model's by its variant (``NoUC-P5`` ->
    ``CSMN-NoUC-P5``), CSMN-P5 when the variant is not known."""
    if method == MODEL_METHOD and variant:
        return csmn_variant_name(variant)
    return METHOD_NAMES.get(method, method)


def csmn_variant_name(variant: str) -> str:
    """The paper's name of a CSMN variant: ``CSMN-`` + its parts, W<D> before the layer, the
    layer always named (``W20`` -> ``CSMN-W20-P5``, ``nouc-p5`` -> ``CSMN-NoUC-P5``)."""
    parts = [p for p in variant.strip().replace("_", "-").split("-") if p]
    parts = [p for p in parts if p.lower() != "csmn"]
    canonical = {"p5": "P5", "r5c": "R5C", "nocnn": "NoCNN", "nouc": "NoUC", "nowo": "NoWO"}
    named = [canonical.get(p.lower(), p.upper() if p.lower().startswith("w") else p)
             for p in parts]
    if not any(p in ("P5", "R5C") for p in named):
        named.append("P5")
    layers = [p for p in named if p in ("P5", "R5C")]
    others = [p for p in named if p not in ("P5", "R5C")]
    return "-".join(["CSMN", *others, *layers])


def paper_key(column: str, by_posts: bool) -> str:
    return f"{column}_by_posts" if by_posts and column == "f1" else column


def comparison_table(task: str, by_posts: bool, results: dict[str, dict[str, Any]],
                     variant: str | None = None) -> tuple[list[str], list[list[Any]]]:
    """The paper's table layout, each metric as ours beside the paper's (None where the paper
    has no such row)."""
    columns = PAPER_COLUMNS[task]
    header = ["method"] + [f"{c} {who}" for c in columns for who in ("ours", "paper")]
    paper = PAPER_RESULTS[task]
    rows = []
    for method, scores in results.items():
        name = method_name(method, variant)
        row: list[Any] = [name]
        for column in columns:
            row += [scores.get(column), paper.get(name, {}).get(paper_key(column, by_posts))]
        rows.append(row)
    return header, rows


def text_table(header: list[str], rows: list[list[Any]]) -> str:
    """A fixed-width table for a terminal."""
    cells = [header] + [[_plain_cell(v) for v in row] for row in rows]
    widths = [max(len(str(r[i])) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w)
                               for i, (v, w) in enumerate(zip(r, widths, strict=True)))
                     for r in cells)


def attention_split(attention: dict[str, Any]) -> list[dict[str, float]]:
    """Per decoding step, the share of attention on each memory type (paper eq. 5: one
    softmax over the slots of all memories, so the shares of a step sum to 1)."""
    import numpy as np

    steps = len(next(iter(attention.values()))) if attention else 0
    return [{name: float(np.asarray(attention[name][t]).sum()) if name in attention else 0.0
             for name in MEMORY_TYPES} for t in range(steps)]


def _figure_uri(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(width: float, height: float, columns: int = 1) -> tuple[Any, list[Any]]:
    # Figure, not pyplot: no global state, no GUI backend, safe in a Ray job's driver.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    axes = figure.subplots(1, columns, squeeze=False)[0]
    return figure, list(axes)


def training_curves_png(history: dict[str, list[list[float]]], metric_name: str,
                        title: str) -> str | None:
    """Loss (train, validation) and the validation metric per epoch, side by side."""
    history = {key: points for key, points in (history or {}).items() if points}
    if not history:
        return None
    figure, (loss_axis, metric_axis) = _figure(8, 2.8, 2)
    for key, style in (("train_loss", "o-"), ("val_loss", "s--")):
        if key in history:
            steps, values = zip(*history[key], strict=True)
            loss_axis.plot(steps, values, style, label=key)
    loss_axis.set(xlabel="epoch", ylabel="cross-entropy", title=f"{title}: loss")
    loss_axis.legend()
    if metric_name in history:
        steps, values = zip(*history[metric_name], strict=True)
        metric_axis.plot(steps, values, "o-", color="tab:green")
    metric_axis.set(xlabel="epoch", ylabel=metric_name, title=f"{title}: {metric_name}")
    for axis in (loss_axis, metric_axis):
        axis.grid(alpha=0.3)
        axis.xaxis.get_major_locator().set_params(integer=True)
    return _figure_uri(figure)


def methods_bar_png(sections: list[dict[str, Any]]) -> str | None:
    """Each task's headline metric per method, ours beside the paper's."""
    if not sections:
        return None
    figure, axes = _figure(4.2 * len(sections), 3.2, len(sections))
    for axis, section in zip(axes, sections, strict=True):
        column = PAPER_COLUMNS[section["task"]][0]
        methods = list(section["results"])
        names = [method_name(m, section.get("variant")) for m in methods]
        ours = [section["results"][m].get(column) or 0.0 for m in methods]
        paper = [PAPER_RESULTS[section["task"]].get(n, {})
                 .get(paper_key(column, section["by_posts"])) or 0.0 for n in names]
        positions = range(len(methods))
        axis.bar([p - 0.2 for p in positions], ours, 0.4, label="ours")
        axis.bar([p + 0.2 for p in positions], paper, 0.4, label="paper (Instagram)")
        axis.set_xticks(list(positions), names, rotation=20)
        axis.set(ylabel=column, title=section["title"])
        axis.legend(fontsize=8)
    return _figure_uri(figure)


def per_user_histogram_png(per_user: dict[str, list[dict[str, Any]]], metric: str,
                           title: str, variant: str | None = None) -> str | None:
    """How the per-user metric spreads, for our model and the strongest baseline."""
    series = {method_name(m, variant): [u[metric] for u in users if u.get(metric) is not None]
              for m, users in per_user.items() if m in (MODEL_METHOD, "1nn-usrim")}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    figure, (axis,) = _figure(4.5, 2.8)
    axis.hist(list(series.values()), bins=10, range=(0.0, 1.0), label=list(series))
    axis.set(xlabel=f"{metric} per user", ylabel="users", title=title)
    axis.legend(fontsize=8)
    return _figure_uri(figure)


def under_root(uri: str | None, root: str) -> bool:
    """Whether ``uri`` is a file under ``root``: a report embeds archive images only, never a
    path a crafted record points elsewhere (``../../etc/passwd``)."""
    import posixpath

    if not uri:
        return False
    if storage.is_s3(uri) or storage.is_s3(root):
        prefix = root.rstrip("/") + "/"
        return uri.startswith(prefix) and ".." not in uri[len(prefix):].split("/")
    import os.path

    real_root = os.path.realpath(storage.resolve(root)[1])
    real = os.path.realpath(storage.resolve(uri)[1])
    return posixpath.commonpath([real_root, real]) == real_root and real != real_root


def _attention_html(steps: list[dict[str, float]], words: list[str]) -> str:
    if not steps:
        return ""
    labels = words + ["_EOS"] if len(words) + 1 == len(steps) else [
        str(i + 1) for i in range(len(steps))]
    rows = []
    for label, shares in zip(labels, steps, strict=False):
        bar = "".join(f"<span class='att {name}' style='width:{100 * shares[name]:.1f}%' "
                      f"title='{name} {shares[name]:.2f}'></span>" for name in MEMORY_TYPES)
        numbers = " / ".join(f"{shares[name]:.2f}" for name in MEMORY_TYPES)
        rows.append(f"<tr><td>{html.escape(label)}</td><td class='bar'>{bar}</td>"
                    f"<td>{numbers}</td></tr>")
    return ("<table class='attn'><tr><th>step</th><th>attention</th>"
            "<th>image / context / output</th></tr>" + "".join(rows) + "</table>")


def _gallery_html(section: dict[str, Any], archive: str) -> str:
    parts = []
    for example in section.get("examples", []):
        image = example.get("image")
        thumbnail = thumbnail_data_uri(image) if under_root(image, archive) else None
        picture = (f"<img src='{thumbnail}' alt='{html.escape(example['post_id'])}'>"
                   if thumbnail else "<div class='noimg'>image unavailable</div>")
        truth = set(example["truth"].split())
        used = example.get("context_used", {})
        lines = [f"<b>{html.escape(example['post_id'])}</b> "
                 f"<span class='muted'>user {html.escape(example['user_id'])}</span>",
                 f"GT: {html.escape(example['truth'])}"]
        for method, text in example["predictions"].items():
            lines.append(f"{html.escape(method_name(method, section.get('variant')))}: "
                         f"{_marked_html(text, truth, set(used.get(method, [])))}")
        attention = _attention_html(example.get("attention", []),
                                    example["predictions"].get(MODEL_METHOD, "").split())
        parts.append(f"<div class='example'>{picture}<div>{'<br>'.join(lines)}{attention}"
                     "</div></div>")
    return "".join(parts)


def _run_link(run: dict[str, Any] | None, label: str, ui: str) -> str:
    if not run or not run.get("run_id"):
        return ""
    url = f"{ui}/#/experiments/{run.get('experiment_id', '0')}/runs/{run['run_id']}"
    return (f"<a href='{html.escape(url, quote=True)}'>{html.escape(label)} "
            f"<code>{html.escape(run['run_id'][:12])}</code></a>")


_DEMO_STYLE = _STYLE + """
table.attn{margin:.4em 0;font-size:85%}table.attn td.bar{width:220px;padding:2px}
.att{display:inline-block;height:10px}.att.image{background:#4c78a8}
.att.context{background:#f2a93b}.att.output{background:#54a24b}
.legend .att{height:auto;padding:0 .6em;color:#fff;font-size:85%}
"""


def render_demo_html(summary: dict[str, Any]) -> str:
    """The demo's page from its summary (csmn.experiments.demo): ``tasks`` with each one's
    results, per-user metrics, examples (with attention) and training history."""
    ui = summary.get("mlflow_ui", MLFLOW_UI)
    sections = summary["sections"]
    title = "CSMN demo report"
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>"
        f"<style>{_DEMO_STYLE}</style></head><body><h1>{title}</h1>",
        f"<p>Archive <code>{html.escape(summary['archive'])}</code>, data "
        f"<code>{html.escape(summary['data'])}</code>, image features from ResNet-101 weights "
        f"<code>{html.escape(str(summary.get('weights')))}</code>. MLflow store "
        f"<code>{html.escape(str(summary.get('tracking_uri')))}</code>; the links below open "
        f"in <code>mlflow ui --backend-store-uri {html.escape(str(summary.get('tracking_uri')))}"
        f"</code> at {html.escape(ui)}.</p>",
    ]
    if summary.get("weights") == "random":
        parts.append("<p><b>Random ResNet-101 weights:</b> the image features carry no visual "
                     "meaning; the numbers show the pipeline, not the method.</p>")
    parts.append("<h2>Results beside the paper's</h2><p class='muted'>The paper's numbers are "
                 "on Instagram (Tables 2 and 3), for scale only: a synthetic archive is not "
                 "Instagram.</p>")
    for section in sections:
        header, rows = comparison_table(section["task"], section["by_posts"], section["results"])
        counts = section.get("counts", {})
        parts.append(f"<h3>{html.escape(section['title'])}</h3><p class='muted'>"
                     f"{counts.get('scored', '?')} posts scored of {counts.get('examples', '?')}"
                     f". {_run_link(section.get('training'), 'training run', ui)} "
                     f"{_run_link(section.get('evaluation'), 'evaluation run', ui)}</p>")
        parts.append(_html_table(header, rows))
        if section.get("promotion"):
            parts.append(f"<p class='muted'>promotion: {html.escape(section['promotion'])}</p>")
    chart = methods_bar_png(sections)
    if chart:
        parts.append(f"<h2>Methods</h2><img class='chart' alt='methods' src='{chart}'>")
    parts.append("<h2>Training</h2>")
    for section in sections:
        training = section.get("training") or {}
        curves = training_curves_png(training.get("metrics", {}),
                                     training.get("metric_name", ""), section["title"])
        if curves:
            parts.append(f"<img class='chart' alt='training {html.escape(section['key'])}' "
                         f"src='{curves}'>")
    parts.append("<h2>Per user</h2>")
    for section in sections:
        metric = PAPER_COLUMNS[section["task"]][0]
        histogram = per_user_histogram_png(section.get("per_user", {}), metric,
                                           section["title"])
        if histogram:
            parts.append(f"<img class='chart' alt='per user {html.escape(section['key'])}' "
                         f"src='{histogram}'>")
    parts.append(
        "<h2>Gallery</h2><p class='muted'>As in the paper's Figure 4: "
        "<span class='hit'>bold</span> = in the ground truth, <span class='ctx'>highlighted"
        "</span> = a word of the user's context memory. Per decoding step of CSMN-P5, how its "
        "attention split between the memories (eq. 5): <span class='legend'>"
        "<span class='att image'>image</span> <span class='att context'>context</span> "
        "<span class='att output'>output</span></span>.</p>")
    for section in sections:
        parts.append(f"<h3>{html.escape(section['title'])}</h3>")
        parts.append(_gallery_html(section, summary["archive"]))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
