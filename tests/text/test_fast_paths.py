"""The shortcuts taken for speed in preprocessing give what the plain definitions give.

Each test holds the plain form (what the code did before the shortcut) and compares it with
the code on many inputs: the synthetic archive's own posts and the edge cases of the other
tests (non-Latin scripts, emoji, NUL, lone surrogates, over-long values, empty lists).
"""

from __future__ import annotations

import json
import os

import pytest

from csmn.data import readers
from csmn.data.paths import PathRejected, resolve_image_path
from csmn.synth import SynthConfig, iter_user_posts, make_user
from csmn.text.filters import is_english_word, non_english_fraction
from csmn.text.normalize import language_words, normalize_hashtag, normalize_hashtags

EDGE_CAPTIONS = [
    "", "   ", "Love this sunset", "LOVE Paris", "well-known place", "Xyzzy qwrtp blorf",
    "我爱 Paris", "café au lait", "ﬁne ｆｕｌｌ width", "10am run 2nd place", "#tag @friend ok",
    "👍🏽 nice 👨‍👩‍👧", "don't stop-", "--- ''' ___", "see www.example.com now", "a.b.c",
    "Привет мир", "mixed ελληνικά words here",
]
EDGE_TAGS = [
    [], [""], ["summer"], ["Summer", "summer", "#summer"], ["summer vibes", "love😍"],
    ["#", "##", "@x", "a#b"], ["café", "日本"], ["x"] * 40, ["a", "b", "a", "", "b", "c"],
]


def _synthetic_posts(count: int) -> list[dict]:
    config = SynthConfig(users=max(1, count // 150))
    posts = []
    for index in range(config.users):
        for planned in iter_user_posts(config, make_user(config, index)):
            try:
                post = json.loads(planned.line)
            except ValueError:
                continue
            if isinstance(post, dict):
                posts.append(post)
    return posts[:count]


@pytest.fixture(scope="module")
def posts() -> list[dict]:
    return _synthetic_posts(3000)


def _plain_fraction(caption: str | None) -> float:
    words = language_words(caption)
    if not words:
        return 0.0
    return sum(1 for w in words if not is_english_word(w)) / len(words)


def _plain_hashtags(tags):
    seen, tokens = set(), []
    for tag in tags or ():
        token = normalize_hashtag(tag)
        if token is not None and token not in seen:
            seen.add(token)
            tokens.append(token)
    return tokens


def test_non_english_fraction_equals_the_plain_count(posts):
    captions = EDGE_CAPTIONS + [p["caption"] for p in posts if isinstance(p.get("caption"), str)]
    for caption in captions + [None]:
        assert non_english_fraction(caption) == _plain_fraction(caption), caption


def test_hashtag_lists_equal_the_seen_set_loop(posts):
    lists = EDGE_TAGS + [p["hashtags"] for p in posts
                         if isinstance(p.get("hashtags"), list)
                         and all(isinstance(t, str) for t in p["hashtags"])]
    for tags in lists + [None]:
        assert normalize_hashtags(tags) == _plain_hashtags(tags), tags


def _outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except readers._Reject as rejected:
        return ("reject", rejected.reason)


def _plain_clean_hashtags(tags, name="hashtags"):
    if len(tags) > readers.MAX_HASHTAGS:
        raise readers._Reject("too_long", f"{name} has {len(tags)} tags, at most "
                                          f"{readers.MAX_HASHTAGS}")
    return [readers.clean_text(t, f"a tag of {name}", readers.MAX_HASHTAG_CHARS) for t in tags]


@pytest.mark.parametrize("tags", [
    *EDGE_TAGS, ["ok", "x\x00y"], ["ok", "\ud800"], ["é\ud800"], ["a" * 256], ["a" * 257],
    ["ok", "é" * 257, "a" * 300], ["ok"] * (readers.MAX_HASHTAGS + 1), ["\x00"],
])
def test_clean_hashtags_equals_the_tag_by_tag_check(tags):
    assert _outcome(readers.clean_hashtags, tags) == _outcome(_plain_clean_hashtags, tags)


def test_relative_archive_roots_follow_the_working_folder(tmp_path, monkeypatch):
    """The roots of an archive are worked out once only when they are absolute."""
    for name in ("a", "b"):
        (tmp_path / name / "arch").mkdir(parents=True)
    for name in ("a", "b"):
        monkeypatch.chdir(tmp_path / name)
        assert resolve_image_path("arch", "x.jpg") == str(tmp_path / name / "arch" / "x.jpg")
        assert resolve_image_path(str(tmp_path / name / "arch"), "x.jpg") == \
            os.path.join(str(tmp_path / name / "arch"), "x.jpg")
        with pytest.raises(PathRejected):
            resolve_image_path(str(tmp_path / name / "arch"), "../x.jpg")
