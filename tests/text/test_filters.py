"""The filters of paper 3.1 on crafted posts, with the real PyEnchant en_US dictionary."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from csmn.text.filters import (
    ADVERTISEMENT,
    BAD_USER,
    KEPT,
    NON_ENGLISH,
    OVER_USER_CAP,
    TOO_FEW_USER_POSTS,
    TOO_LONG,
    TOO_SHORT,
    FilterThresholds,
    filter_user_posts,
    flagged_posts_limit,
    is_advertisement,
    is_bad_user,
    is_english_word,
    is_non_english,
    length_rule,
    non_english_fraction,
)

T0 = datetime(2016, 6, 1, tzinfo=UTC)
SMALL = FilterThresholds(max_flagged_posts_min=2, max_flagged_posts_fraction=0.15,
                         max_posts_per_user=6, min_posts_per_user=4)


def test_english_words_in_en_us():
    assert is_english_word("beautiful")
    assert is_english_word("Paris")
    assert is_english_word("LOVE")
    assert is_english_word("don't")
    assert is_english_word("well-known")
    assert not is_english_word("xqzvbn")
    assert not is_english_word("schön")


def test_non_english_threshold_is_more_than_20_percent():
    # 1 unknown word in 5 = 20%: kept; 2 in 5 = 40%: dropped
    assert non_english_fraction("a lovely day at sea xqzvbn") == pytest.approx(1 / 6)
    assert not is_non_english("lovely day at the xqzvbn")
    assert is_non_english("lovely day at xqzvbn qqwrtz")
    assert is_non_english("Das ist ein schönes Wetter heute")
    assert is_non_english("今日はいい天気ですね")
    # Indic words are whole words, each one unknown (a dictionary may know a lone letter)
    assert non_english_fraction("நான் இன்று மகிழ்ச்சியாக இருக்கிறேன்") == 1.0
    assert non_english_fraction("नमस्ते I love this beach day") == pytest.approx(1 / 6)


def test_hashtags_mentions_emoji_numbers_do_not_count_as_words():
    # only "sunset" and "with" are words here
    text = "sunset with @xqzvbn #qqwrtz #zzyzx 😍😍 2016 10am"
    assert non_english_fraction(text) == 0.0
    assert not is_non_english(text)


def test_caption_without_words_is_not_non_english():
    assert non_english_fraction("") == 0.0
    assert not is_non_english("#only #tags 😍")


def test_hyperlinks_are_advertisements():
    assert is_advertisement("Shop now at https://store.example.com")
    assert is_advertisement("link in bio www.example.com")
    assert is_advertisement("dm for prices: mystore.shop")
    assert not is_advertisement("a quiet morning by the lake")
    assert not is_advertisement(None)


@pytest.mark.parametrize(
    ("flagged", "posts", "bad"),
    [(15, 10, False), (16, 10, True), (15, 100, False), (16, 100, True),
     (150, 1000, False), (151, 1000, True)],
)
def test_bad_user_rule_is_more_than_max_15_or_15_percent(flagged, posts, bad):
    assert flagged_posts_limit(posts) == max(15, 0.15 * posts)
    assert is_bad_user(flagged, posts) is bad


def test_length_rule_3_to_15():
    assert length_rule(2) == TOO_SHORT
    assert length_rule(3) is None
    assert length_rule(15) is None
    assert length_rule(16) == TOO_LONG


def _post(i: int, caption_len: int = 5, hashtag_len: int = 5, non_english: bool = False,
          advertisement: bool = False, dated: bool = True) -> dict:
    return {
        "post_id": f"p{i:03d}",
        "created_at": T0 + timedelta(days=i) if dated else None,
        "non_english": non_english,
        "advertisement": advertisement,
        "post_tokens": ["w"] * caption_len,
        "hashtag_tokens": ["#t"] * hashtag_len,
    }


def test_user_filter_rules_in_order_per_task():
    posts = [_post(i) for i in range(8)]
    posts.append(_post(8, non_english=True, advertisement=True))  # counted as non_english
    posts.append(_post(9, advertisement=True))
    posts.append(_post(10, caption_len=2))  # too short caption, hashtags fine
    posts.append(_post(11, hashtag_len=16))  # hashtags too long, caption fine
    statuses = filter_user_posts(posts, SMALL)
    by_id = {p["post_id"]: s for p, s in zip(posts, statuses, strict=True)}
    assert by_id["p008"] == {"post": NON_ENGLISH, "hashtag": NON_ENGLISH}
    assert by_id["p009"] == {"post": ADVERTISEMENT, "hashtag": ADVERTISEMENT}
    assert by_id["p010"]["post"] == TOO_SHORT
    assert by_id["p011"]["hashtag"] == TOO_LONG
    # the cap (6) keeps the most recent posts of each task
    caption_kept = sorted(p for p, s in by_id.items() if s["post"] == KEPT)
    hashtag_kept = sorted(p for p, s in by_id.items() if s["hashtag"] == KEPT)
    assert caption_kept == ["p003", "p004", "p005", "p006", "p007", "p011"]
    assert hashtag_kept == ["p003", "p004", "p005", "p006", "p007", "p010"]
    capped = [p for p, s in by_id.items() if s["post"] == OVER_USER_CAP]
    assert sorted(capped) == ["p000", "p001", "p002"]  # the three oldest


def test_user_with_too_many_flagged_posts_loses_everything():
    # limit max(2, 0.15 x 8) = 2: three flagged posts make a bad user
    posts = [_post(i) for i in range(5)]
    posts += [_post(5, non_english=True), _post(6, advertisement=True),
              _post(7, non_english=True)]
    statuses = filter_user_posts(posts, SMALL)
    assert [s["post"] for s in statuses[:5]] == [BAD_USER] * 5
    assert [s["hashtag"] for s in statuses[:5]] == [BAD_USER] * 5
    assert [s["post"] for s in statuses[5:]] == [NON_ENGLISH, ADVERTISEMENT, NON_ENGLISH]
    # two flagged posts are within the limit: the others stay
    statuses = filter_user_posts(posts[:7], SMALL)
    assert [s["post"] for s in statuses[:5]] == [KEPT] * 5


def test_user_with_too_few_posts_is_dropped_per_task():
    posts = [_post(i, hashtag_len=1 if i else 5) for i in range(4)]
    statuses = filter_user_posts(posts, SMALL)
    assert [s["post"] for s in statuses] == [KEPT] * 4  # 4 posts = the minimum
    assert statuses[0]["hashtag"] == TOO_FEW_USER_POSTS  # 1 hashtag post left
    assert [s["hashtag"] for s in statuses[1:]] == [TOO_SHORT] * 3


def test_cap_is_deterministic_and_order_independent():
    posts = [_post(i) for i in range(10)]
    posts.append(_post(10, dated=False))  # no time: after the dated ones
    forward = filter_user_posts(posts, SMALL)
    backward = filter_user_posts(posts[::-1], SMALL)[::-1]
    assert forward == backward
    kept = [p["post_id"] for p, s in zip(posts, forward, strict=True) if s["post"] == KEPT]
    assert kept == ["p004", "p005", "p006", "p007", "p008", "p009"]
