"""The demo's report page, rendered from a summary like the demo's, opened in a real headless
Chromium (tests/browser.py): it is not blank, its tables and every image rendered, the console
has no errors, user text is escaped and only archive images are embedded."""

from __future__ import annotations

import io

import browser
import numpy as np
import pytest
from PIL import Image

from csmn.eval import report

pytestmark = pytest.mark.skipif(browser.chromium() is None,
                                reason="chromium missing: run `make system-packages`")

HOSTILE = "<script>alert('x')</script>"


def _photo(path, colour) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), colour).save(path, format="JPEG")
    return str(path)


def _summary(tmp_path) -> dict:
    archive = tmp_path / "archive"
    inside = _photo(archive / "images" / "u1" / "a.jpg", (200, 40, 40))
    broken = archive / "images" / "u1" / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    outside = _photo(tmp_path / "elsewhere" / "secret.jpg", (0, 0, 0))
    attention = {"image": np.array([[0.5], [0.1]]), "context": np.array([[0.2, 0.1], [0.6, 0.1]]),
                 "output": np.array([[0.2], [0.2]])}
    example = {"post_id": "u1_1", "user_id": f"u1 {HOSTILE}", "truth": "#beach #sun",
               "context_words": ["#beach"], "context_size": 1,
               "predictions": {"csmn": "#beach", "1nn-im": "#sun #city"},
               "context_used": {"csmn": ["#beach"], "1nn-im": []},
               "attention": report.attention_split(attention)}
    examples = [{**example, "image": inside},
                {**example, "post_id": "u1_2", "image": str(broken)},
                {**example, "post_id": "u1_3", "image": outside},
                {**example, "post_id": "u1_4", "image": str(archive / "images" / ".." / ".."
                                                         / "elsewhere" / "secret.jpg")}]
    results = {"csmn": {"f1": 0.31, "precision": 0.3, "recall": 0.32},
               "1nn-im": {"f1": 0.12}, "1nn-usrim": {"f1": 0.2}}
    per_user = {m: [{"user_id": f"u{i}", "n_posts": 10, "f1": v + 0.05 * i} for i in range(4)]
                for m, v in (("csmn", 0.2), ("1nn-usrim", 0.1))}
    history = {"train_loss": [[1, 5.0], [2, 4.1]], "val_loss": [[1, 5.2], [2, 4.6]],
               "val_f1": [[1, 0.1], [2, 0.25]]}
    section = {"key": "hashtag_test", "task": "hashtag", "split": "test", "by_posts": False,
               "title": f"hashtag, test {HOSTILE}", "results": results,
               "counts": {"examples": 40, "scored": 38}, "per_user": per_user,
               "promotion": "csmn-hashtag v1 vs no champion: promoted", "examples": examples,
               "training": {"run_id": "abc123", "experiment_id": "1", "metrics": history,
                            "metric_name": "val_f1"},
               "evaluation": {"run_id": "def456", "experiment_id": "1"}}
    return {"archive": str(archive), "data": str(tmp_path / "data"), "weights": "random",
            "tracking_uri": "sqlite:///x.db", "sections": [section]}


def test_comparison_table_puts_ours_beside_the_papers():
    header, rows = report.comparison_table("hashtag", True, {"csmn": {"f1": 0.5}})
    assert header == ["method", "f1 ours", "f1 paper"]
    assert rows == [["CSMN-P5", 0.5, 0.390]]  # Table 3, split by posts
    header, _ = report.comparison_table("post", False, {"csmn": {}})
    assert header[1:3] == ["bleu_1 ours", "bleu_1 paper"]
    assert report.text_table(["m", "f1"], [["CSMN-P5", 0.5]]).splitlines()[1] == \
        "CSMN-P5  0.500"


def test_a_variant_is_named_as_the_paper_names_it_with_its_own_figures():
    _, rows = report.comparison_table("hashtag", False, {"csmn": {"f1": 0.2}}, "NoUC-P5")
    assert rows == [["CSMN-NoUC-P5", 0.2, None]]  # Table 3 has no NoUC by users: no figure
    assert report.method_name("csmn", "w20") == "CSMN-W20-P5"
    assert report.method_name("csmn") == "CSMN-P5" and report.method_name("1nn-im", "R5C") == \
        "1NN-Im"


def test_html_tables_escape_for_html_only():
    table = report._html_table(["user"], [["jane_doe&co*"]])
    assert "<td>jane_doe&amp;co*</td>" in table
    assert report._table(["user"], [["jane_doe&co*"]])[2] == "| jane\\_doe&amp;co\\* |"


def test_training_curves_skip_empty_histories():
    assert report.training_curves_png({"train_loss": []}, "val_f1", "t") is None
    assert report.training_curves_png({"train_loss": [[1, 2.0]], "val_f1": []}, "val_f1", "t")


def test_attention_split_sums_each_step_over_slots():
    steps = report.attention_split({"image": np.array([[0.5], [0.1]]),
                                    "context": np.array([[0.2, 0.1], [0.6, 0.1]]),
                                    "output": np.array([[0.2], [0.2]])})
    assert steps[0] == pytest.approx({"image": 0.5, "context": 0.3, "output": 0.2})
    assert all(sum(s.values()) == pytest.approx(1.0) for s in steps)


def test_demo_report_renders_in_chromium(tmp_path):
    page = tmp_path / "report.html"
    page.write_text(report.render_demo_html(_summary(tmp_path)))
    source = page.read_text()
    assert HOSTILE not in source and "&lt;script&gt;" in source

    check = browser.open_page(page)

    assert check.errors == []
    assert check.scripts == 0  # the hostile user text stayed text
    assert check.broken_images == []
    alts = [i["alt"] for i in check.images]
    # Charts: methods, training curves, per-user histogram; the gallery: the one readable
    # image under the archive root. The broken file and both paths outside the archive are
    # not embedded ("image unavailable"), never a broken <img>.
    assert alts == ["methods", "training hashtag_test", "per user hashtag_test", "u1_1"]
    assert all(i["width"] > 0 and i["height"] > 0 for i in check.images)
    assert check.text.count("image unavailable") == 3
    # The results table (header + 3 methods) and one attention table (header + 2 steps) per
    # gallery post.
    assert check.tables == [4] + [3] * 4
    assert "CSMN-P5\t0.310\t0.230" in check.text
    assert "#beach\n_EOS" in check.text or "_EOS" in check.text
    with Image.open(io.BytesIO(check.screenshot)) as shot:
        assert shot.height >= check.height * 0.9 > 1000  # the whole page, not the viewport
    assert check.screenshot_colours() > 50
