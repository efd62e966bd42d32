"""The noise the paper's filters exist for (section 3.1), planted per post at its own rate."""

from __future__ import annotations

import json
import random
from typing import Any

from csmn.synth.config import SynthConfig
from csmn.synth.users import UserProfile
from csmn.synth.vocabulary import (
    AD_WORDS,
    BROKEN_IMAGE_KINDS,
    BROKEN_RECORD_KINDS,
    LINK_DOMAINS,
    REQUIRED_FIELDS,
)


def link(rng: random.Random) -> str:
    word = rng.choice(AD_WORDS)
    code = "".join(rng.choice("abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789")
                   for _ in range(6))
    domain = rng.choice(LINK_DOMAINS)
    return rng.choice((
        f"http://bit.ly/{code}",
        f"https://{domain}{word}.com/{code}",
        f"www.{word}{domain}.com",
        f"http://www.{domain}.net/{word}?ref={code}",
    ))


def post_noise(
    rng: random.Random, config: SynthConfig, profile: UserProfile, post_index: int
) -> tuple[list[str], str | None, str | None]:
    """Content noise codes, the broken-record kind and the broken-image kind of one post."""
    noise: list[str] = []
    if post_index in profile.bad_posts:
        noise.append(rng.choice(("non_english", "link")))
    else:
        if rng.random() < config.non_english_rate:
            noise.append("non_english")
        if rng.random() < config.link_rate:
            noise.append("link")
    u = rng.random()
    if u < config.short_caption_rate:
        noise.append("short_caption")
    elif u < config.short_caption_rate + config.long_caption_rate:
        noise.append("long_caption")
    u = rng.random()
    if u < config.short_hashtags_rate:
        noise.append("short_hashtags")
    elif u < config.short_hashtags_rate + config.long_hashtags_rate:
        noise.append("long_hashtags")
    for code, rate in (
        ("mention", config.mention_rate),
        ("zwj_emoji", config.zwj_emoji_rate),
        ("bare_hashtags", config.bare_hashtags_rate),
    ):
        if rng.random() < rate:
            noise.append(code)
    broken_record = None
    if rng.random() < config.broken_record_rate:
        broken_record = rng.choice(BROKEN_RECORD_KINDS)
    broken_image = None
    if rng.random() < config.broken_image_rate:
        broken_image = rng.choice(BROKEN_IMAGE_KINDS)
    return noise, broken_record, broken_image


def break_record(rng: random.Random, record: dict[str, Any], kind: str) -> str:
    """The JSON line of a record broken in one of the ways real exports break."""
    if kind == "missing_field":
        broken = dict(record)
        del broken[rng.choice(REQUIRED_FIELDS)]
        return json.dumps(broken, ensure_ascii=False)
    if kind == "wrong_type":
        broken = dict(record)
        variant = rng.randrange(5)
        if variant == 0:
            broken["hashtags"] = len(record["hashtags"])
        elif variant == 1:
            broken["caption"] = {"text": record["caption"]}
        elif variant == 2:
            broken["post_id"] = [record["post_id"]]
        elif variant == 3:
            broken["created_at"] = True
        else:
            broken["image"] = 404
        return json.dumps(broken, ensure_ascii=False)
    line = json.dumps(record, ensure_ascii=False)
    variant = rng.randrange(3)
    if variant == 0:  # cut off mid-write
        return line[: max(1, int(len(line) * rng.uniform(0.3, 0.9)))]
    if variant == 1:  # a Python repr instead of JSON
        return repr(record)
    return line[:-1] + ',}'  # trailing comma
