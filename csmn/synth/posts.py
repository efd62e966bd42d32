"""The posts of one user: captions, hashtag lists, the noise planted in them, their truth."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from csmn.data import storage
from csmn.synth.config import SynthConfig
from csmn.synth.images import ImageJob
from csmn.synth.noise import break_record, link, post_noise
from csmn.synth.streams import derive_seed, length_cum_weights, zipf_cum_weights
from csmn.synth.users import UserProfile
from csmn.synth.vocabulary import (
    AD_WORDS,
    CATEGORIES,
    FOREIGN_WORDS,
    GLOBAL_TAGS,
    NICHES,
    PHRASE_TEMPLATES,
    ZWJ_EMOJI,
)


@dataclass
class PlannedPost:
    """One post as written (its JSON line) and as planted (its truth row and image job)."""

    line: str
    truth: dict[str, Any]
    image_job: ImageJob | None


class Lengths:
    """The tables every post of an archive draws from, built once per archive."""

    def __init__(self, config: SynthConfig) -> None:
        self.caption = length_cum_weights(config.caption_mean_words)
        self.hashtags = length_cum_weights(config.hashtag_mean_count)
        self.noun_weights = {
            i: zipf_cum_weights(len(c.nouns)) for i, c in enumerate(CATEGORIES)
        }
        self.tag_weights = {
            i: zipf_cum_weights(len(c.hashtags), 0.8) for i, c in enumerate(CATEGORIES)
        }
        self.niche_word_rate = config.niche_word_rate
        self.niche_tag_rate = config.niche_tag_rate
        longest = max(len(t) for t in PHRASE_TEMPLATES)
        self.templates_up_to = [
            [t for t in PHRASE_TEMPLATES if len(t) <= n] for n in range(longest + 1)
        ]


def _pick_length(rng: random.Random, table: tuple[list[int], list[float]]) -> int:
    values, cumulative = table
    return rng.choices(values, cum_weights=cumulative)[0]


def _body_words(
    rng: random.Random, profile: UserProfile, category: int, count: int, lengths: Lengths,
    niche: int | None,
) -> list[str]:
    """``count`` topic words in short English phrases, in the user's favourite adjectives and
    with some nouns from the post's niche (``niche``: its position in ``profile.niches``)."""
    cat = CATEGORIES[category]
    niche_words = NICHES[profile.niches[niche]].words if niche is not None else ()
    noun_weights = lengths.noun_weights[category]
    words: list[str] = []
    while len(words) < count:
        remaining = count - len(words)
        # Whole phrases only: a template that fits what is left, or one lone topic word.
        fitting = lengths.templates_up_to[min(remaining, len(lengths.templates_up_to) - 1)]
        template = rng.choice(fitting) if fitting else ("N",)
        for slot in template:
            if slot == "N":
                if niche_words and rng.random() < lengths.niche_word_rate:
                    words.append(rng.choice(niche_words))
                else:
                    words.append(rng.choices(cat.nouns, cum_weights=noun_weights)[0])
            elif slot == "A":
                if rng.random() < profile.adjective_rate:
                    words.append(rng.choice(profile.favourite_adjectives))
                else:
                    words.append(rng.choice(cat.adjectives))
            elif slot == "V":
                words.append(rng.choice(cat.verbs))
            else:
                words.append(slot)
    return words[:count]


def _caption(
    rng: random.Random, profile: UserProfile, category: int, count: int, lengths: Lengths,
    noise: list[str], niche: int | None,
) -> str:
    """A caption of exactly ``count`` whitespace-separated tokens."""
    if count == 0:
        for code in ("mention", "zwj_emoji", "non_english", "link"):
            if code in noise:
                noise.remove(code)  # nothing to plant it in
        return ""
    emoji: list[str] = []
    if count >= 4 and rng.random() < profile.emoji_rate:
        emoji = rng.sample(profile.emoji, min(len(profile.emoji), rng.choice((1, 1, 2))))
    if "zwj_emoji" in noise:
        if count >= 2:
            emoji = emoji[: max(0, count - 2)] + [rng.choice(ZWJ_EMOJI)]
        else:
            noise.remove("zwj_emoji")  # the truth only lists what was planted
    n_words = count - len(emoji)
    opener: list[str] = []
    closer: list[str] = []
    companion: list[str] = []
    if rng.random() < profile.opener_rate:
        candidate = rng.choice(profile.openers).split()
        if len(candidate) + 2 <= n_words:
            opener = candidate
    if rng.random() < profile.closer_rate:
        candidate = profile.closers[0].split()
        if len(opener) + len(candidate) + 2 <= n_words:
            closer = candidate
    # Names are written capitalized, which some spell checkers take for unknown proper nouns:
    # only in captions long enough that one such token stays well below the 20% threshold.
    if n_words >= 6 and rng.random() < profile.name_rate:
        if len(opener) + len(closer) + 4 <= n_words:
            companion = ["with", rng.choice(profile.names)]
    n_body = n_words - len(opener) - len(closer) - len(companion)
    body = _body_words(rng, profile, category, n_body, lengths, niche)
    words = opener + body + companion + closer
    # Plant in an order where no noise overwrites another: the link, then the mention, then
    # the foreign words on what is left; a noise with no room left is not planted.
    taken: set[int] = set()
    if "link" in noise and not words:
        noise.remove("link")
    if "link" in noise:
        position = rng.randrange(1, len(words)) if len(words) >= 3 else len(words) - 1
        words[position] = link(rng)
        taken.add(position)
        if len(words) >= 3:
            words[0] = rng.choice(AD_WORDS)
    free = [i for i in range(len(words)) if i not in taken]
    if "mention" in noise:
        if len(free) >= (2 if "non_english" in noise else 1):
            position = rng.choice(free)
            words[position] = "@" + rng.choice(profile.friends)
            free.remove(position)
        else:
            noise.remove("mention")
    if "non_english" in noise:
        if free:
            for position in rng.sample(free, max(1, math.ceil(0.6 * len(free)))):
                words[position] = rng.choice(FOREIGN_WORDS)
        else:
            noise.remove("non_english")
    if words and not words[0].startswith(("@", "http", "www")):
        words[0] = words[0][0].upper() + words[0][1:]
    if words and profile.punctuation and not words[-1].startswith(("@", "http", "www")):
        words[-1] += profile.punctuation
    return " ".join(words + emoji)


def _hashtags(
    rng: random.Random, profile: UserProfile, category: int, count: int, lengths: Lengths,
    niche: int | None,
) -> tuple[list[str], list[str]]:
    """``count`` distinct hashtags and which of them are the user's signature tags.

    Besides the signature tags, a slot holds a tag of the post's niche (by the user's own
    preferences over its pool), of the category, one of the user's favourite generic tags, a
    global tag or a stray tag of any category. A post outside the user's niches gives the
    niche's share to its category."""
    signature = [
        tag for tag, rate in zip(profile.signature_hashtags, profile.signature_rates, strict=True)
        if rng.random() < rate
    ][:count]
    chosen = set(signature)
    others: list[str] = []
    cat = CATEGORIES[category]
    tag_weights = lengths.tag_weights[category]
    niche_share = lengths.niche_tag_rate if niche is not None else 0.0
    # The shares of the other sources shrink with the niche's: 55/20/15/10 without a niche.
    scale = 1.0 - niche_share
    attempts = 0
    while len(signature) + len(others) < count and attempts < 200:
        attempts += 1
        u = rng.random()
        if u < niche_share:
            pool = NICHES[profile.niches[niche]].hashtags
            tag = rng.choices(pool, cum_weights=profile.niche_weights[niche])[0]
        elif (u := (u - niche_share) / scale) < 0.55:
            tag = rng.choices(cat.hashtags, cum_weights=tag_weights)[0]
        elif u < 0.75:
            tag = rng.choice(profile.favourite_tags)
        elif u < 0.9 or attempts > 100:
            tag = rng.choice(GLOBAL_TAGS)
        else:
            tag = rng.choice(rng.choice(CATEGORIES).hashtags)
        if tag not in chosen:
            chosen.add(tag)
            others.append(tag)
    rng.shuffle(others)
    tags = signature + others if profile.signature_first else others + signature
    return tags, signature


def _post_niche(rng: random.Random, profile: UserProfile, category: int) -> int | None:
    """Which of the user's niches a post in ``category`` speaks for (None: none sits there)."""
    here = profile.niches_in(category)
    if not here:
        return None
    # A user with both niches in one category favours the first, as their primary niche.
    return here[0] if len(here) == 1 or rng.random() < 0.6 else here[1]


def _lengths_of(rng: random.Random, noise: list[str], lengths: Lengths) -> tuple[int, int]:
    """Caption tokens and hashtags of one post: Table 1's distributions, or planted noise."""
    if "short_caption" in noise:
        # A planted non-English or advertising post keeps at least the word that shows it.
        low = 1 if ("non_english" in noise or "link" in noise) else 0
        n_caption = rng.randint(low, 2)
    elif "long_caption" in noise:
        n_caption = rng.randint(16, 40)
    else:
        n_caption = _pick_length(rng, lengths.caption)
    if "short_hashtags" in noise:
        n_tags = rng.randint(0, 2)
    elif "long_hashtags" in noise:
        n_tags = rng.randint(16, 30)
    else:
        n_tags = _pick_length(rng, lengths.hashtags)
    return n_caption, n_tags


def iter_user_posts(
    config: SynthConfig, profile: UserProfile, lengths: Lengths | None = None
) -> Iterator[PlannedPost]:
    """The posts of one user, in time order, generated lazily."""
    lengths = lengths or Lengths(config)
    rng = random.Random(derive_seed(config.seed, "posts", profile.index))
    timestamp = profile.start
    for k in range(profile.n_posts):
        timestamp += timedelta(hours=rng.expovariate(1.0 / profile.mean_gap_hours))
        timestamp = timestamp.replace(microsecond=0)
        if rng.random() < config.off_topic_rate:
            category = rng.randrange(config.categories)
        else:
            category = rng.choices(profile.favourite_categories,
                                   weights=profile.category_weights)[0]
        niche = _post_niche(rng, profile, category)
        noise, broken_record, broken_image = post_noise(rng, config, profile, k)
        n_caption, n_tags = _lengths_of(rng, noise, lengths)
        caption = _caption(rng, profile, category, n_caption, lengths, noise, niche)
        tags, signature_used = _hashtags(rng, profile, category, n_tags, lengths, niche)
        if "bare_hashtags" in noise:
            if tags:
                tags = [t.lstrip("#") for t in tags]
            else:
                noise.remove("bare_hashtags")  # the truth only lists what was planted
        post_id = f"{profile.user_id}_{k:05d}"
        image_path = f"images/{profile.user_id}/{post_id}.jpg"
        record = {
            "user_id": profile.user_id,
            "post_id": post_id,
            "created_at": timestamp.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "image": image_path,
            "caption": caption,
            "hashtags": tags,
        }
        line = (
            break_record(rng, record, broken_record) if broken_record
            else json.dumps(record, ensure_ascii=False)
        )
        truth = {
            "user_id": profile.user_id,
            "post_id": post_id,
            "created_at": timestamp,
            "category": CATEGORIES[category].name,
            "niche": NICHES[profile.niches[niche]].name if niche is not None else None,
            "noise": noise,
            "broken_record": broken_record,
            "broken_image": broken_image,
            "caption_words": len(caption.split()),
            "hashtag_count": len(tags),
            "signature_hashtags": signature_used,
            "image": image_path,
        }
        # The image's stream knows the user only through the post's index, never their
        # niche or traits: pixels tell the category and nothing else.
        job = ImageJob(
            uri=storage.join(config.out, image_path),
            seed=derive_seed(config.seed, "image", profile.index, k),
            category=category,
            size=config.image_size,
            quality=config.image_quality,
            broken=broken_image,
        )
        yield PlannedPost(line, truth, job)
