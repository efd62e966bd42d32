"""A synthetic Instagram-like archive with the statistics and the learnable structure of InstaPIC.

The released InstaPIC-1.1M data can no longer be downloaded, so ``csmn synth`` writes an archive
that the rest of the pipeline treats exactly like user data (the raw-archive contract in
``schemas/raw_post.json``)::

    <out>/posts/part-NNNNN.jsonl        raw posts, one JSON object per line
    <out>/images/<user_id>/<post_id>.jpg small JPEGs drawn with PIL
    <out>/truth/users/part-NNNNN.parquet what each user is made of (schemas/truth_user.json)
    <out>/truth/posts/part-NNNNN.parquet what each post is made of (schemas/truth_post.json)
    <out>/truth/summary.json            the config and the planted counts

What can be learned from it:

- 27 categories (the paper crawled 27 Pinterest categories), each with a visual signature
  (palette, shape, texture) and a topic vocabulary of real English words plus topic hashtags.
- Users with 1-3 favourite categories and a personal vocabulary: signature hashtags that no
  other user writes (``#rosebakes17``), names of the people and pets in their posts, favourite
  emoji and adjectives, openers and closers they keep using. Signature hashtags appear in most
  of a user's posts, so a model that sees the user's context words can predict them and a
  model that does not, cannot.
- Captions of 8.5 words and hashtag lists of 7.5 tags on average (Table 1 of the paper).

And the noise the paper's filters exist for, each at its own rate (``*_rate`` knobs):
non-English posts, posts with links, too short and too long captions and hashtag lists, users
with too few or too many posts, users with many non-English/advertising posts, broken records
(invalid JSON, missing fields, wrong types), broken images (empty, truncated, not a JPEG,
missing), @mentions and emoji with zero-width-joiner sequences. The truth tables say which
post got which noise, so every filter can be checked against it.

Generation streams: users are generated one at a time, posts are written shard by shard and
images through a bounded thread pool, so memory stays flat however large the archive. Every
user and every image draws from its own random stream derived from (seed, user, post), so the
same seed gives byte-identical posts and images whatever the thread timing.
"""

from __future__ import annotations

import argparse
import bisect
import colorsys
import dataclasses
import hashlib
import io
import json
import logging
import math
import random
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from PIL import Image, ImageDraw

from csmn.config import add_config_arguments, config_from_args, config_to_dict
from csmn.data import storage
from csmn.data.schemas import conform

log = logging.getLogger(__name__)


@dataclass
class SynthConfig:
    """What to generate. Rates are per post unless named ``*_users_rate`` (per user)."""

    out: str = field(default="", metadata={"help": "archive root: a local folder or s3://"})
    users: int = field(default=100, metadata={"help": "number of users (~7,400 for 1.1M posts)"})
    seed: int = field(default=0, metadata={"help": "same seed, byte-identical archive"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing archive"})
    posts_per_shard: int = field(default=10_000, metadata={"help": "lines per posts/ shard"})
    categories: int = field(default=27, metadata={"help": "how many of the 27 categories"})
    image_size: int = field(default=64, metadata={"help": "side of the square JPEGs, pixels"})
    image_quality: int = field(default=90, metadata={"help": "JPEG quality"})
    image_threads: int = field(default=4, metadata={"help": "threads drawing and writing images"})
    write_images: bool = field(default=True, metadata={"help": "false: posts and truth only"})
    # Lengths (paper Table 1: 8.55 words per caption, 7.45 hashtags per list, both 3..15).
    caption_mean_words: float = 8.5
    hashtag_mean_count: float = 7.5
    # Posts per user of a regular user: log-normal, truncated to [posts_min, posts_max]. The
    # floor leaves a regular user above the paper's 50 after the post-level noise is dropped.
    posts_median: float = 100.0
    posts_sigma: float = 0.8
    posts_min: int = 75
    posts_max: int = 1000
    off_topic_rate: float = field(
        default=0.08, metadata={"help": "posts outside the user's favourite categories"}
    )
    signature_tag_rate: float = field(
        default=0.6, metadata={"help": "mean chance a signature hashtag is in a user's post"}
    )
    # User-level noise.
    too_few_users_rate: float = field(default=0.05, metadata={"help": "users with 5..45 posts"})
    too_many_users_rate: float = field(
        default=0.01, metadata={"help": "users with 1,300..1,600 posts"}
    )
    spammer_users_rate: float = field(
        default=0.03, metadata={"help": "users whose non-English/link posts trip the user rule"}
    )
    spammer_bad_fraction: float = 0.4
    # Post-level noise.
    non_english_rate: float = 0.05
    link_rate: float = 0.03
    short_caption_rate: float = 0.04
    long_caption_rate: float = 0.04
    short_hashtags_rate: float = 0.05
    long_hashtags_rate: float = 0.04
    mention_rate: float = 0.05
    zwj_emoji_rate: float = 0.05
    bare_hashtags_rate: float = field(
        default=0.05, metadata={"help": "posts whose hashtags are written without '#'"}
    )
    broken_record_rate: float = 0.005
    broken_image_rate: float = 0.005


RATE_FIELDS = tuple(
    f.name for f in dataclasses.fields(SynthConfig) if f.name.endswith(("_rate", "_fraction"))
)


@dataclass(frozen=True)
class Category:
    """A topic: what its images look like and the words and hashtags its posts use."""

    name: str
    hue: float  # degrees
    saturation: float
    lightness: float
    shape: str
    texture: str
    nouns: tuple[str, ...]
    adjectives: tuple[str, ...]
    verbs: tuple[str, ...]  # -ing forms
    hashtags: tuple[str, ...]  # the category's 10 most common tags, most common first
    emoji: tuple[str, ...]
    stems: tuple[str, ...]  # endings of the signature hashtags of users who love it


def _category(
    name: str, visual: tuple[float, float, float, str, str], nouns: str, adjectives: str,
    verbs: str, hashtags: str, emoji: str, stems: str,
) -> Category:
    hue, saturation, lightness, shape, texture = visual
    return Category(
        name, hue, saturation, lightness, shape, texture, tuple(nouns.split()),
        tuple(adjectives.split()), tuple(verbs.split()),
        tuple("#" + t for t in hashtags.split()), tuple(emoji.split()), tuple(stems.split()),
    )


# Every word a clean caption can contain passes PyEnchant's en_US check in lower case
# (tests/test_synth.py checks it), so only planted noise trips the language filter.
CATEGORIES: tuple[Category, ...] = (
    _category(
        "food", (20, 0.75, 0.55, "circle", "checker"),
        "pasta pizza salad soup burger cake bread cheese dinner lunch breakfast dessert sauce "
        "noodles chicken steak tacos sushi kitchen recipe plate bowl cookies pancakes waffles "
        "chocolate avocado spices",
        "delicious tasty fresh homemade crispy spicy sweet savory warm cheesy yummy",
        "cooking baking eating tasting grilling sharing making",
        "food foodie instafood yummy delicious foodporn homemade dinner foodstagram eat",
        "🍕 🍰 😋 🍜", "bakes eats kitchen",
    ),
    _category(
        "coffee", (28, 0.45, 0.35, "ring", "stripes_v"),
        "coffee latte espresso cappuccino tea mug cup cafe beans morning smoothie juice cocktail "
        "wine lemonade foam barista cinnamon milk brew",
        "hot strong smooth creamy iced bitter cozy perfect",
        "sipping brewing drinking pouring roasting",
        "coffee coffeetime latte cafe coffeelover barista tea drinks cheers espresso",
        "☕ 🍷 🍹 🥤", "brews sips cafe",
    ),
    _category(
        "travel", (205, 0.7, 0.6, "triangle", "grid"),
        "city trip journey airport flight passport map hotel adventure island streets museum "
        "temple tower bridge train road view destination country vacation holiday",
        "amazing beautiful ancient exotic breathtaking memorable foreign crowded",
        "exploring traveling wandering flying discovering visiting roaming",
        "travel wanderlust travelgram instatravel trip vacation explore adventure "
        "travelphotography tourism",
        "✈️ 🌍 🗺️ 🧳", "travels roams abroad",
    ),
    _category(
        "beach", (180, 0.7, 0.55, "ellipse", "waves"),
        "beach ocean waves sand sunset surf shore palm sea coast tide shells boat sunshine "
        "breeze paradise lagoon",
        "sunny salty tropical turquoise golden calm warm",
        "swimming surfing relaxing tanning sailing snorkeling",
        "beach summer ocean sea sunset surf beachlife island sand tropical",
        "🌊 🏖️ 🌴 ☀️", "waves beachdays surfs",
    ),
    _category(
        "fashion", (320, 0.7, 0.55, "diamond", "diagonal"),
        "dress outfit shoes heels bag skirt jacket jeans style look boutique scarf blouse coat "
        "sunglasses accessories jewelry necklace earrings",
        "stylish chic elegant trendy classic vintage casual fancy",
        "wearing shopping styling posing dressing",
        "fashion style ootd outfit fashionista instafashion stylish fashionblogger lookbook "
        "shopping",
        "👗 👠 👜 💃", "style closet wears",
    ),
    _category(
        "menswear", (225, 0.5, 0.3, "square", "stripes_v"),
        "suit tie watch beard shirt sneakers leather boots blazer gentleman barber cologne belt "
        "denim",
        "sharp dapper classy sleek smart rugged",
        "grooming wearing suiting shaving",
        "menswear mensfashion gentleman dapper menstyle suit beard watch classy streetstyle",
        "👔 🕶️ ⌚ 🧔", "dapper suits grooms",
    ),
    _category(
        "beauty", (345, 0.65, 0.65, "heart", "dots"),
        "makeup lipstick hair nails skin liner mascara brows lashes polish salon curls braids "
        "glow palette foundation blush serum",
        "glossy flawless natural shiny bold soft glamorous",
        "blending curling glowing painting pampering",
        "makeup beauty hair nails skincare makeupartist lipstick glam hairstyle mua",
        "💄 💅 💋 ✨", "glam glow beauty",
    ),
    _category(
        "fitness", (0, 0.8, 0.45, "bars", "stripes_h"),
        "gym workout training muscles squats weights cardio run sweat gains abs protein coach "
        "routine session marathon",
        "strong fit healthy intense sweaty tired motivated",
        "lifting running training sweating pushing stretching",
        "fitness gym workout fit fitfam training health motivation bodybuilding cardio",
        "💪 🏋️ 🏃 🔥", "lifts fit runs",
    ),
    _category(
        "wellness", (270, 0.4, 0.7, "ring", "plain"),
        "yoga meditation mat breath balance peace mind soul spa candle herbs calm retreat",
        "peaceful mindful grateful balanced serene gentle",
        "breathing meditating healing resting flowing",
        "yoga meditation wellness mindfulness selfcare namaste peace health zen gratitude",
        "🧘 🌿 🙏 🕯️", "zen yoga calm",
    ),
    _category(
        "dogs", (35, 0.55, 0.5, "ellipse", "dots"),
        "dog puppy pup doggy paws leash walk bone tail fur park treats collar cuddles friend "
        "bark",
        "fluffy cute playful loyal sleepy happy adorable silly",
        "playing walking sleeping cuddling fetching running",
        "dog dogsofinstagram puppy dogs pet cute instadog doglover pup petsofinstagram",
        "🐶 🐾 🦴 🐕", "pup dogs paws",
    ),
    _category(
        "cats", (50, 0.7, 0.55, "crescent", "stripes_h"),
        "cat kitten kitty whiskers purr meow box yarn nap window catnip paws",
        "lazy fluffy grumpy curious sleepy adorable soft",
        "napping purring hunting stretching lounging",
        "cat cats catsofinstagram kitten meow catlover instacat kitty pets catstagram",
        "🐱 😺 🐈 🧶", "cats kitty purrs",
    ),
    _category(
        "nature", (120, 0.55, 0.45, "triangle", "dots"),
        "forest trees leaves flowers moss river waterfall sky clouds rain sunrise wildlife birds "
        "butterfly meadow valley rocks",
        "green wild lush misty fresh quiet natural",
        "growing blooming flowing watching wandering",
        "nature naturelovers naturephotography landscape trees forest wildlife green earth "
        "outdoors",
        "🌲 🍃 🌸 🦋", "wild outdoors roots",
    ),
    _category(
        "hiking", (150, 0.45, 0.4, "zigzag", "plain"),
        "mountain trail summit peak camp tent backpack boots hike cliff canyon lake campfire snow "
        "compass",
        "steep rugged epic remote scenic chilly wild",
        "hiking camping climbing trekking exploring",
        "hiking mountains outdoors camping adventure hike explore getoutside trail naturelover",
        "⛰️ 🏕️ 🥾 🌄", "hikes trails peaks",
    ),
    _category(
        "gardening", (95, 0.6, 0.5, "star", "checker"),
        "garden plants roses tulips seeds soil pots herbs tomatoes vegetables greenhouse blossom "
        "harvest compost succulents cactus",
        "blooming fresh organic green fragrant colorful",
        "planting growing watering digging pruning harvesting",
        "garden gardening plants flowers plantlover gardenlife growyourown succulents homegrown "
        "bloom",
        "🌱 🌷 🌻 🍅", "garden grows blooms",
    ),
    _category(
        "home", (40, 0.35, 0.7, "square", "plain"),
        "sofa pillows lamp shelf rug interior bedroom walls curtains table chair candles frames "
        "mirror corner kitchen",
        "cozy minimal modern bright rustic warm neat",
        "decorating painting arranging organizing styling",
        "homedecor interior interiordesign home decor homesweethome design livingroom cozy "
        "interiors",
        "🏡 🛋️ 🕯️ 🪴", "home nest decor",
    ),
    _category(
        "architecture", (210, 0.15, 0.55, "bars", "grid"),
        "building tower bridge cathedral skyline facade arches columns stairs window concrete "
        "glass steel dome street skyscraper",
        "modern ancient tall grand geometric urban",
        "building looking standing rising",
        "architecture building city urban architecturelovers design skyline cityscape "
        "archilovers streetphotography",
        "🏛️ 🏙️ 🌉 🏗️", "lines city builds",
    ),
    _category(
        "art", (290, 0.65, 0.5, "star", "diagonal"),
        "painting canvas sketch drawing brush colors gallery portrait artist studio ink "
        "watercolor pencil artwork mural paint",
        "creative abstract colorful bold original vivid",
        "painting drawing sketching creating mixing",
        "art artist drawing painting artwork sketch illustration creative instaart watercolor",
        "🎨 🖌️ ✏️ 🖼️", "art sketches paints",
    ),
    _category(
        "crafts", (12, 0.6, 0.65, "hexagon", "dots"),
        "craft yarn wood glue paper fabric project scissors beads quilt ribbon workshop needle "
        "thread",
        "handmade colorful tiny creative simple",
        "knitting sewing gluing crafting building crocheting",
        "diy handmade crafts craft knitting sewing crochet maker handcrafted crafty",
        "🧵 🧶 ✂️ 🪡", "makes crafts stitches",
    ),
    _category(
        "books", (35, 0.25, 0.6, "square", "stripes_h"),
        "book novel pages chapter library shelf story author poetry bookstore bookmark tea",
        "classic thrilling inspiring favorite quiet rainy",
        "reading writing finishing rereading",
        "books bookstagram reading book booklover bookworm read library novel bibliophile",
        "📚 📖 🔖 ☕", "reads books pages",
    ),
    _category(
        "music", (255, 0.6, 0.4, "circle", "rings"),
        "guitar piano song concert band stage drums vinyl record album melody lyrics festival "
        "singer headphones",
        "loud live acoustic groovy soulful electric",
        "playing singing dancing listening jamming recording",
        "music guitar concert musician livemusic song piano band vinyl instamusic",
        "🎸 🎹 🎶 🎤", "music plays sings",
    ),
    _category(
        "cars", (355, 0.6, 0.3, "ellipse", "diagonal"),
        "car engine wheels drive road garage race turbo tires motorcycle ride speed truck",
        "fast shiny loud classic sporty powerful",
        "driving racing riding cruising washing",
        "car cars carsofinstagram auto carporn supercar drive racing motorcycle carlifestyle",
        "🚗 🏎️ 🏍️ 🛞", "drives garage rides",
    ),
    _category(
        "sports", (100, 0.65, 0.4, "circle", "stripes_v"),
        "football soccer basketball game team match goal stadium players coach season ball court "
        "field win fans",
        "huge proud epic tough exciting",
        "playing winning scoring cheering watching",
        "sports football soccer basketball game team sport athlete win gameday",
        "⚽ 🏀 🏆 🥇", "plays team goals",
    ),
    _category(
        "family", (55, 0.75, 0.65, "heart", "plain"),
        "kids baby family son daughter mom dad toddler toys smile bath birthday school park "
        "grandma playground",
        "little sweet precious happy tiny silly",
        "playing laughing growing learning giggling",
        "family kids baby love mom motherhood children toddler familytime babyboy",
        "👶 🧸 👪 🍼", "family crew tribe",
    ),
    _category(
        "weddings", (330, 0.35, 0.8, "ring", "dots"),
        "wedding bride groom dress rings bouquet ceremony vows cake reception veil engagement "
        "couple love flowers dance",
        "romantic elegant beautiful magical special white",
        "dancing celebrating kissing toasting",
        "wedding bride love weddingday engagement bridal weddingdress groom weddingphotography "
        "married",
        "💍 👰 💒 🥂", "weds bride wedding",
    ),
    _category(
        "holidays", (140, 0.7, 0.35, "star", "stripes_h"),
        "party winter tree lights gifts birthday balloons candles pumpkins costume holiday "
        "fireworks celebration friends snow ornaments",
        "festive merry spooky bright joyful sparkly",
        "celebrating decorating wrapping partying gathering",
        "christmas party holiday birthday celebration halloween festive holidays newyear fun",
        "🎄 🎃 🎉 🎁", "parties holidays celebrates",
    ),
    _category(
        "photography", (0, 0.0, 0.5, "square", "rings"),
        "camera lens shot light shadow frame portrait film focus exposure photo tripod edit "
        "composition",
        "moody sharp dramatic minimal golden grainy",
        "shooting editing framing capturing chasing",
        "photography photo photooftheday photographer canon nikon picoftheday portrait "
        "blackandwhite light",
        "📷 📸 🎞️ 🌅", "shots lens frames",
    ),
    _category(
        "tech", (190, 0.75, 0.45, "cross", "grid"),
        "laptop code desk setup keyboard screen gadget robot phone games console software "
        "computer mouse monitor app",
        "new smart fast digital wireless nerdy",
        "coding gaming building testing typing",
        "tech technology gaming coding gamer setup geek computer programming gadgets",
        "💻 🎮 🤖 ⌨️", "codes tech setup",
    ),
)

# Tags everybody uses, the way #love and #instagood top every real hashtag count.
GLOBAL_TAGS: tuple[str, ...] = tuple(
    "#" + t for t in (
        "love instagood photooftheday happy beautiful picoftheday follow like4like instadaily "
        "tbt fun smile friends me cute life nofilter repost summer amazing instalike followme "
        "bestoftheday likeforlike instamood weekend goodvibes tagsforlikes"
    ).split()
)
GLOBAL_EMOJI: tuple[str, ...] = tuple("😍 ❤️ 🙌 ✨ 😂 😊 👌 🔥 💯 😎 🥰 💕 👍🏽".split())
# Zero-width-joiner sequences: one emoji to a reader, several code points to a tokenizer.
ZWJ_EMOJI: tuple[str, ...] = (
    "👩\u200d🍳", "👨\u200d👩\u200d👧", "🏃\u200d♀️", "🏳️\u200d🌈", "👩\u200d💻",
    "❤️\u200d🔥", "🧑\u200d🎨", "👨\u200d👩\u200d👧\u200d👦", "🐕\u200d🦺", "🧘\u200d♀️",
)
FUNCTION_WORDS = frozenset(
    "the and my this is so love some was time for nothing beats all day just best ever with".split()
)
GENERAL_ADJECTIVES: tuple[str, ...] = tuple(
    "lovely gorgeous epic cozy awesome wonderful fabulous stunning lucky blessed perfect "
    "incredible magical happy dreamy simple classic favorite".split()
)
OPENERS: tuple[str, ...] = (
    "good morning", "happy weekend", "finally", "throwback to", "weekend mood", "another day",
    "guess what", "so much love", "little reminder", "oh hello", "lazy morning", "hello weekend",
    "back at it", "new week", "currently",
)
CLOSERS: tuple[str, ...] = (
    "love it", "see you soon", "have a great day", "so good", "stay tuned", "enjoy",
    "more soon", "cheers", "until next time", "happy days", "thank you", "stay cozy",
)
# Names that are also dictionary words in lower case (preprocessing lowercases before or after
# the language test, either way they pass).
NAMES: tuple[str, ...] = tuple(
    "max rose lily daisy ruby jack grace holly ginger pepper buddy rocky olive bean honey maple "
    "jasper amber ivy hazel sky dolly duke bear teddy ace sunny willow autumn penny sugar "
    "cookie charlie molly".split()
)
PUNCTUATION_HABITS: tuple[str, ...] = ("!", "!!", ".", "...", "", "!!!")
# Words PyEnchant's en_US rejects: Spanish, Portuguese, Indonesian, romanized Hindi/Korean/
# Japanese, for the non-English posts.
FOREIGN_WORDS: tuple[str, ...] = tuple(
    "hermosa comida delicioso hoy vamos gracias noche playa feliz mejor familia mucho siempre "
    "hermoso enak sekali hari makan bersama teman senang cantik sayang pagi selamat liburan "
    "jalan kopi terima kasih obrigada lindo saudade muito dia kya hai bahut accha yaar mera "
    "saranghae daebak jinjja gamsahamnida mashita kawaii sugoi oishii arigato tolong sangat "
    "indah semua tidak juga bisa banget mantap gue lagi aja nggak desayuno cena viaje verano "
    "sabroso".split()
)
AD_WORDS: tuple[str, ...] = tuple(
    "shop now sale discount order today free shipping limited offer deal click link".split()
)
LINK_DOMAINS: tuple[str, ...] = ("bit.ly", "shop", "deals", "store", "promo", "outlet")
PHRASE_TEMPLATES: tuple[tuple[str, ...], ...] = tuple(
    tuple(t.split()) for t in (
        "A N", "N and N", "V the N", "my A N", "this N is so A", "love this N", "some A N",
        "the N was A", "time for N", "nothing beats A N", "V all day", "A N and A N",
        "just V", "best N ever", "so A", "V with the N",
    )
)
BROKEN_IMAGE_KINDS = ("zero_byte", "truncated", "not_jpeg", "missing")
BROKEN_RECORD_KINDS = ("invalid_json", "missing_field", "wrong_type")
USER_KINDS = ("regular", "too_few", "too_many", "spammer")
REQUIRED_FIELDS = ("user_id", "post_id", "image", "caption", "hashtags")
EPOCH_START = datetime(2012, 1, 1, tzinfo=UTC)


def english_vocabulary() -> set[str]:
    """Every word a clean caption can be made of (all pass en_US, see the tests)."""
    words: set[str] = set(FUNCTION_WORDS) | set(GENERAL_ADJECTIVES) | set(NAMES)
    for phrase in OPENERS + CLOSERS:
        words.update(phrase.split())
    for category in CATEGORIES:
        words.update(category.nouns + category.adjectives + category.verbs)
    return words


# --------------------------------------------------------------------------------------------
# Random streams


def derive_seed(*parts: object) -> int:
    """A 64-bit seed from any parts; stable across processes (unlike ``hash``)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def length_cum_weights(mean: float, low: int = 3, high: int = 15) -> tuple[list[int], list[float]]:
    """Lengths low..high, right-skewed like real caption lengths, with mean ``mean``.

    A gamma-like base shape, exponentially tilted (weights x exp(t x length)); the mean grows
    monotonically with t, so bisection finds the t that makes the knob mean what it says.
    """
    values = list(range(low, high + 1))
    if not low < mean < high:
        raise ValueError(f"mean length {mean} must lie strictly inside ({low}, {high})")
    base = [(v - low + 1) ** 1.5 * math.exp(-(v - low + 1) / 3.0) for v in values]

    def weights(tilt: float) -> list[float]:
        return [b * math.exp(tilt * (v - low)) for b, v in zip(base, values, strict=True)]

    def mean_of(tilt: float) -> float:
        w = weights(tilt)
        return sum(v * x for v, x in zip(values, w, strict=True)) / sum(w)

    lo, hi = -30.0, 30.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if mean_of(mid) < mean:
            lo = mid
        else:
            hi = mid
    cumulative, total = [], 0.0
    for x in weights((lo + hi) / 2):
        total += x
        cumulative.append(total)
    return values, cumulative


def zipf_cum_weights(n: int, exponent: float = 1.0) -> list[float]:
    cumulative, total = [], 0.0
    for rank in range(1, n + 1):
        total += 1.0 / rank**exponent
        cumulative.append(total)
    return cumulative


# --------------------------------------------------------------------------------------------
# Users


@dataclass
class UserProfile:
    """One synthetic user: what they post about and how they write."""

    index: int
    user_id: str
    kind: str
    n_posts: int
    favourite_categories: list[int]
    category_weights: list[float]
    owner_name: str
    names: list[str]
    friends: list[str]
    signature_hashtags: list[str]
    signature_rates: list[float]
    signature_first: bool
    favourite_tags: list[str]
    emoji: list[str]
    emoji_rate: float
    openers: list[str]
    opener_rate: float
    closers: list[str]
    closer_rate: float
    favourite_adjectives: list[str]
    adjective_rate: float
    name_rate: float
    punctuation: str
    start: datetime
    mean_gap_hours: float
    bad_posts: frozenset[int]  # post indices planted as non-English/advertising (spammers)

    def truth_row(self, categories: Sequence[Category]) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "kind": self.kind,
            "n_posts": self.n_posts,
            "favourite_categories": [categories[c].name for c in self.favourite_categories],
            "category_weights": self.category_weights,
            "names": self.names,
            "friends": self.friends,
            "signature_hashtags": self.signature_hashtags,
            "favourite_tags": self.favourite_tags,
            "emoji": self.emoji,
            "openers": self.openers,
            "closers": self.closers,
            "favourite_adjectives": self.favourite_adjectives,
            "punctuation": self.punctuation,
            "planted_bad_posts": len(self.bad_posts),
        }


def _post_count(rng: random.Random, config: SynthConfig, kind: str) -> int:
    if kind == "too_few":
        return rng.randint(5, 45)
    if kind == "too_many":
        # Far enough above 1,000 that dropping every noisy post still leaves more than 1,000.
        return rng.randint(1300, 1600)
    mu = math.log(config.posts_median)
    for _ in range(1000):
        count = int(round(rng.lognormvariate(mu, config.posts_sigma)))
        if config.posts_min <= count <= config.posts_max:
            return count
    return min(max(int(config.posts_median), config.posts_min), config.posts_max)


def _user_kind(rng: random.Random, config: SynthConfig) -> str:
    u = rng.random()
    for kind, rate in (
        ("too_few", config.too_few_users_rate),
        ("too_many", config.too_many_users_rate),
        ("spammer", config.spammer_users_rate),
    ):
        if u < rate:
            return kind
        u -= rate
    return "regular"


def make_user(config: SynthConfig, index: int) -> UserProfile:
    """User ``index`` of the archive, from its own random stream."""
    rng = random.Random(derive_seed(config.seed, "user", index))
    categories = CATEGORIES[: config.categories]
    kind = _user_kind(rng, config)
    n_posts = _post_count(rng, config, kind)

    # Category popularity is skewed (food and fashion are everywhere, tech less so).
    n_favourites = rng.choices((1, 2, 3), weights=(0.3, 0.4, 0.3))[0]
    popularity = zipf_cum_weights(len(categories), 0.6)
    favourites: list[int] = []
    while len(favourites) < min(n_favourites, len(categories)):
        pick = bisect.bisect_left(popularity, rng.random() * popularity[-1])
        if pick not in favourites:
            favourites.append(pick)
    raw_weights = sorted((rng.uniform(0.2, 1.0) for _ in favourites), reverse=True)
    weights = [round(w / sum(raw_weights), 4) for w in raw_weights]

    owner = rng.choice(NAMES)
    companions = rng.sample([n for n in NAMES if n != owner], rng.randint(1, 2))
    primary = categories[favourites[0]]
    secondary = categories[favourites[-1]]
    # The user index as suffix makes each signature tag unique to its user: the names and
    # stems are letters only, so no two users can produce the same string.
    suffix = str(index)
    patterns = [
        f"#{owner}{rng.choice(primary.stems)}{suffix}",
        f"#{owner}and{companions[0]}{suffix}",
        f"#{rng.choice(GENERAL_ADJECTIVES)}{owner}{suffix}",
        f"#team{owner}{suffix}",
        f"#{owner}{rng.choice(secondary.stems)}{suffix}",
    ]
    signature: list[str] = []
    for tag in rng.sample(patterns, len(patterns)):
        if tag not in signature:
            signature.append(tag)
    signature = signature[: rng.randint(2, 4)]
    mean_rate = min(max(config.signature_tag_rate, 0.0), 1.0)
    spread = min(mean_rate, 1.0 - mean_rate, 0.2)
    signature_rates = [round(rng.uniform(mean_rate - spread, mean_rate + spread), 3)
                       for _ in signature]

    emoji = rng.sample(list(primary.emoji), 2) + rng.sample(list(GLOBAL_EMOJI), rng.randint(0, 2))
    friends = [
        f"{rng.choice(NAMES)}{rng.choice(('_', '.', ''))}{rng.choice(primary.nouns)}"
        f"{rng.randint(1, 99)}"
        for _ in range(2)
    ]
    bad_posts: frozenset[int] = frozenset()
    if kind == "spammer":
        # Plant more bad posts than max(15, 0.15 x posts): the whole user must be dropped.
        n_bad = max(16, math.ceil(config.spammer_bad_fraction * n_posts))
        n_bad = min(n_bad, n_posts)
        bad_posts = frozenset(rng.sample(range(n_posts), n_bad))

    return UserProfile(
        index=index,
        user_id=f"u{index:06d}",
        kind=kind,
        n_posts=n_posts,
        favourite_categories=favourites,
        category_weights=weights,
        owner_name=owner,
        names=[n.capitalize() for n in companions],
        friends=friends,
        signature_hashtags=signature,
        signature_rates=signature_rates,
        signature_first=rng.random() < 0.5,
        favourite_tags=rng.sample(list(GLOBAL_TAGS), 3),
        emoji=emoji,
        emoji_rate=rng.uniform(0.2, 0.8),
        openers=rng.sample(list(OPENERS), rng.randint(1, 2)),
        opener_rate=rng.uniform(0.1, 0.45),
        closers=rng.sample(list(CLOSERS), 1),
        closer_rate=rng.uniform(0.1, 0.4),
        favourite_adjectives=rng.sample(list(GENERAL_ADJECTIVES), 3),
        adjective_rate=rng.uniform(0.2, 0.5),
        name_rate=rng.uniform(0.1, 0.35),
        punctuation=rng.choice(PUNCTUATION_HABITS),
        start=EPOCH_START + timedelta(days=rng.uniform(0, 4.5 * 365)),
        mean_gap_hours=rng.uniform(12, 120),
        bad_posts=bad_posts,
    )


# --------------------------------------------------------------------------------------------
# Posts


@dataclass
class PlannedPost:
    """One post as written (its JSON line) and as planted (its truth row and image job)."""

    line: str
    truth: dict[str, Any]
    image_job: ImageJob | None


@dataclass(frozen=True)
class ImageJob:
    uri: str
    seed: int
    category: int
    size: int
    quality: int
    broken: str | None


class _Lengths:
    def __init__(self, config: SynthConfig) -> None:
        self.caption = length_cum_weights(config.caption_mean_words)
        self.hashtags = length_cum_weights(config.hashtag_mean_count)
        self.noun_weights = {
            i: zipf_cum_weights(len(c.nouns)) for i, c in enumerate(CATEGORIES)
        }
        self.tag_weights = {
            i: zipf_cum_weights(len(c.hashtags), 0.8) for i, c in enumerate(CATEGORIES)
        }
        longest = max(len(t) for t in PHRASE_TEMPLATES)
        self.templates_up_to = [
            [t for t in PHRASE_TEMPLATES if len(t) <= n] for n in range(longest + 1)
        ]


def _pick_length(rng: random.Random, table: tuple[list[int], list[float]]) -> int:
    values, cumulative = table
    return rng.choices(values, cum_weights=cumulative)[0]


def _body_words(
    rng: random.Random, profile: UserProfile, category: int, count: int, lengths: _Lengths
) -> list[str]:
    """``count`` topic words in short English phrases, in the user's favourite adjectives."""
    cat = CATEGORIES[category]
    noun_weights = lengths.noun_weights[category]
    words: list[str] = []
    while len(words) < count:
        remaining = count - len(words)
        # Whole phrases only: a template that fits what is left, or one lone topic word.
        fitting = lengths.templates_up_to[min(remaining, len(lengths.templates_up_to) - 1)]
        template = rng.choice(fitting) if fitting else ("N",)
        for slot in template:
            if slot == "N":
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
    rng: random.Random, profile: UserProfile, category: int, count: int, lengths: _Lengths,
    noise: list[str],
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
    body = _body_words(rng, profile, category, n_body, lengths)
    words = opener + body + companion + closer
    # Plant in an order where no noise overwrites another: the link, then the mention, then
    # the foreign words on what is left; a noise with no room left is not planted.
    taken: set[int] = set()
    if "link" in noise and not words:
        noise.remove("link")
    if "link" in noise:
        position = rng.randrange(1, len(words)) if len(words) >= 3 else len(words) - 1
        words[position] = _link(rng)
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


def _link(rng: random.Random) -> str:
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


def _hashtags(
    rng: random.Random, profile: UserProfile, category: int, count: int, lengths: _Lengths
) -> tuple[list[str], list[str]]:
    """``count`` distinct hashtags and which of them are the user's signature tags."""
    signature = [
        tag for tag, rate in zip(profile.signature_hashtags, profile.signature_rates, strict=True)
        if rng.random() < rate
    ][:count]
    chosen = set(signature)
    others: list[str] = []
    cat = CATEGORIES[category]
    tag_weights = lengths.tag_weights[category]
    attempts = 0
    while len(signature) + len(others) < count and attempts < 200:
        attempts += 1
        u = rng.random()
        if u < 0.55:
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


def _post_noise(
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


def _break_record(rng: random.Random, record: dict[str, Any], kind: str) -> str:
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


def iter_user_posts(
    config: SynthConfig, profile: UserProfile, lengths: _Lengths | None = None
) -> Iterator[PlannedPost]:
    """The posts of one user, in time order, generated lazily."""
    lengths = lengths or _Lengths(config)
    rng = random.Random(derive_seed(config.seed, "posts", profile.index))
    n_categories = config.categories
    timestamp = profile.start
    for k in range(profile.n_posts):
        timestamp += timedelta(hours=rng.expovariate(1.0 / profile.mean_gap_hours))
        timestamp = timestamp.replace(microsecond=0)
        if rng.random() < config.off_topic_rate:
            category = rng.randrange(n_categories)
        else:
            category = rng.choices(profile.favourite_categories,
                                   weights=profile.category_weights)[0]
        noise, broken_record, broken_image = _post_noise(rng, config, profile, k)
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
        caption = _caption(rng, profile, category, n_caption, lengths, noise)
        tags, signature_used = _hashtags(rng, profile, category, n_tags, lengths)
        if "bare_hashtags" in noise:
            tags = [t.lstrip("#") for t in tags]
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
            _break_record(rng, record, broken_record) if broken_record
            else json.dumps(record, ensure_ascii=False)
        )
        truth = {
            "user_id": profile.user_id,
            "post_id": post_id,
            "created_at": timestamp,
            "category": CATEGORIES[category].name,
            "noise": noise,
            "broken_record": broken_record,
            "broken_image": broken_image,
            "caption_words": len(caption.split()),
            "hashtag_count": len(tags),
            "signature_hashtags": signature_used,
            "image": image_path,
        }
        job = ImageJob(
            uri=storage.join(config.out, image_path),
            seed=derive_seed(config.seed, "image", profile.index, k),
            category=category,
            size=config.image_size,
            quality=config.image_quality,
            broken=broken_image,
        )
        yield PlannedPost(line, truth, job)


# --------------------------------------------------------------------------------------------
# Images


def _rgb(hue: float, lightness: float, saturation: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hls_to_rgb((hue % 360) / 360.0, min(max(lightness, 0), 1),
                                  min(max(saturation, 0), 1))
    return int(r * 255), int(g * 255), int(b * 255)


def _shift(colour: tuple[int, int, int], delta: Sequence[int]) -> tuple[int, int, int]:
    r, g, b = (min(255, max(0, c + d)) for c, d in zip(colour, delta, strict=True))
    return r, g, b


def _mix(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> tuple[int, int, int]:
    r, g, bl = (int(x + (y - x) * t) for x, y in zip(a, b, strict=True))
    return r, g, bl


def _polygon(cx: float, cy: float, radii: Sequence[float], angle: float) -> list[tuple]:
    n = len(radii)
    points = []
    for i, r in enumerate(radii):
        theta = angle + 2 * math.pi * i / n
        points.append((cx + r * math.cos(theta), cy + r * math.sin(theta)))
    return points


@lru_cache(maxsize=4096)
def _texture_mask(kind: str, size: int, period: int, offset: int, variant: int) -> Image.Image:
    """A texture as an 'L' mask, cached: a few hundred distinct ones cover every image, and
    pasting a colour through a mask is far cheaper than drawing dozens of primitives."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    width = max(1, period // 3)
    if kind == "stripes_h":
        for y in range(-offset, size, period):
            draw.rectangle([0, y, size, y + width], fill=255)
    elif kind == "stripes_v":
        for x in range(-offset, size, period):
            draw.rectangle([x, 0, x + width, size], fill=255)
    elif kind == "diagonal":
        for k in range(-size - offset, size, period):
            draw.line([(k, size), (k + size, 0)], fill=255, width=width)
    elif kind == "dots":
        radius = max(1, period // 4)
        for y in range(offset, size, period):
            for x in range(offset, size, period):
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=255)
    elif kind == "checker":
        for y in range(0, size, period):
            for x in range(0, size, period):
                if (x // period + y // period + offset) % 2 == 0:
                    draw.rectangle([x, y, x + period - 1, y + period - 1], fill=255)
    elif kind == "grid":
        for k in range(offset, size, period):
            draw.line([(k, 0), (k, size)], fill=255, width=1)
            draw.line([(0, k), (size, k)], fill=255, width=1)
    elif kind == "waves":
        phase = 2 * math.pi * variant / 16
        amplitude = period / 3
        for y0 in range(offset, size, period):
            points = [
                (x, y0 + amplitude * math.sin(phase + 4 * math.pi * x / size))
                for x in range(0, size + 4, 4)
            ]
            draw.line(points, fill=255, width=width)
    elif kind == "rings":
        cx, cy = (variant % 4 + 0.5) * size / 4, (variant // 4 + 0.5) * size / 4
        for r in range(period, 2 * size, period):
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=255, width=width)
    return mask


def _paste_texture(image: Image.Image, kind: str, colour, rng: random.Random) -> None:
    if kind == "plain":
        return
    size = image.width
    period = max(4, size // rng.choice((6, 8, 10)))
    offset = rng.randrange(period)
    variant = rng.randrange(16) if kind in ("rings", "waves") else 0
    mask = _texture_mask(kind, size, period, offset, variant)
    image.paste(colour, box=(0, 0, size, size), mask=mask)


@lru_cache(maxsize=16)
def _gradient_mask(size: int) -> Image.Image:
    return Image.linear_gradient("L").resize((size, size))


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, size: int, fg, bg, rng) -> None:
    r = rng.uniform(0.15, 0.32) * size
    cx = rng.uniform(r, size - r)
    cy = rng.uniform(r, size - r)
    angle = rng.uniform(0, 2 * math.pi)
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif kind == "ellipse":
        draw.ellipse([cx - r, cy - 0.6 * r, cx + r, cy + 0.6 * r], fill=fg)
    elif kind == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=max(2, int(r / 3)))
    elif kind == "square":
        draw.polygon(_polygon(cx, cy, [r * 1.2] * 4, angle * 0.2 + math.pi / 4), fill=fg)
    elif kind == "diamond":
        draw.polygon(_polygon(cx, cy, [r * 1.2, r * 0.7] * 2, math.pi / 2), fill=fg)
    elif kind == "triangle":
        draw.polygon(_polygon(cx, cy, [r * 1.2] * 3, -math.pi / 2 + angle * 0.1), fill=fg)
    elif kind == "star":
        draw.polygon(_polygon(cx, cy, [r * 1.2, r * 0.5] * 5, angle), fill=fg)
    elif kind == "hexagon":
        draw.polygon(_polygon(cx, cy, [r] * 6, angle), fill=fg)
    elif kind == "cross":
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fg)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fg)
    elif kind == "bars":
        w = r / 2
        for i in range(3):
            height = rng.uniform(0.5, 1.8) * r
            x0 = cx - 1.5 * w + i * w
            draw.rectangle([x0, cy + r - height, x0 + w * 0.8, cy + r], fill=fg)
    elif kind == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        dx = 0.45 * r
        draw.ellipse([cx - r + dx, cy - r - dx / 2, cx + r + dx, cy + r - dx / 2], fill=bg)
    elif kind == "heart":
        points = []
        for i in range(24):
            t = 2 * math.pi * i / 24
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            points.append((cx + x * r / 16, cy - y * r / 16))
        draw.polygon(points, fill=fg)
    elif kind == "zigzag":
        base = cy + r
        points = [(0, base)]
        for i in range(4):
            points.append(((i + 0.5) * size / 4, base - rng.uniform(0.8, 2.0) * r))
            points.append(((i + 1) * size / 4, base))
        points.append((size, size))
        points.append((0, size))
        draw.polygon(points, fill=fg)


def draw_image(category: int, seed: int, size: int) -> Image.Image:
    """The category's visual signature, jittered per post.

    Nothing in an image depends on its user: an image-only model (1NN-Im, CSMN-NoUC) must
    not be able to tell whose post it sees, or the user context would not be what
    personalizes (DESIGN.md, the synthetic archive). A per-user colour tint, as an earlier
    version drew, let CSMN-NoUC name the user's signature hashtags from the colour alone."""
    cat = CATEGORIES[category]
    rng = random.Random(seed)
    delta = [rng.randint(-12, 12) for _ in range(3)]
    top = _shift(_rgb(cat.hue, cat.lightness + 0.15, cat.saturation), delta)
    bottom = _shift(_rgb(cat.hue + 10, cat.lightness - 0.1, cat.saturation), delta)
    fg = _shift(_rgb(cat.hue + 180, 0.5 if cat.saturation else 0.1, cat.saturation + 0.2), delta)
    image = Image.composite(
        Image.new("RGB", (size, size), bottom), Image.new("RGB", (size, size), top),
        _gradient_mask(size),
    )
    _paste_texture(image, cat.texture, _mix(bottom, fg, 0.3), rng)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.choice((1, 1, 2))):
        _draw_shape(draw, cat.shape, size, fg, _mix(top, bottom, 0.5), rng)
    return image


def image_bytes(job: ImageJob) -> bytes | None:
    """The file content for an image job (None: the file is planted missing)."""
    if job.broken == "missing":
        return None
    if job.broken == "zero_byte":
        return b""
    if job.broken == "not_jpeg":
        return b"<html><body><h1>404 Not Found</h1></body></html>\n"
    buffer = io.BytesIO()
    draw_image(job.category, job.seed, job.size).save(
        buffer, format="JPEG", quality=job.quality
    )
    data = buffer.getvalue()
    if job.broken == "truncated":
        return data[: len(data) // 2]
    return data


def _write_image(job: ImageJob) -> bool:
    data = image_bytes(job)
    if data is None:
        return False
    storage.write_bytes(job.uri, data)
    return True


class _ImageWriter:
    """Images through a thread pool, at most ``limit`` in flight (memory stays flat)."""

    def __init__(self, threads: int, limit: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads),
                                       thread_name_prefix="synth-img")
        self.pending: deque[Future] = deque()
        self.limit = limit
        self.written = 0

    def submit(self, job: ImageJob) -> None:
        self.pending.append(self.pool.submit(_write_image, job))
        while len(self.pending) > self.limit:
            self.written += self.pending.popleft().result()

    def close(self) -> None:
        try:
            while self.pending:
                self.written += self.pending.popleft().result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------
# The archive


class _ShardWriter:
    """posts/part-NNNNN.jsonl with their truth parts, one shard in memory at a time."""

    def __init__(self, out: str, posts_per_shard: int) -> None:
        self.out = out
        self.posts_per_shard = posts_per_shard
        self.lines: list[str] = []
        self.post_truth: list[dict[str, Any]] = []
        self.user_truth: list[dict[str, Any]] = []
        self.shards = 0

    def add_user(self, row: dict[str, Any]) -> None:
        self.user_truth.append(row)

    def add(self, post: PlannedPost) -> None:
        name = f"part-{self.shards:05d}.jsonl"
        post.truth["shard"] = name
        post.truth["line"] = len(self.lines) + 1
        self.lines.append(post.line)
        self.post_truth.append(post.truth)
        if len(self.lines) >= self.posts_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.lines and not self.user_truth:
            return
        part = f"part-{self.shards:05d}"
        if self.lines:
            storage.write_text(
                storage.join(self.out, "posts", f"{part}.jsonl"), "\n".join(self.lines) + "\n"
            )
            storage.write_parquet(
                storage.join(self.out, "truth", "posts", f"{part}.parquet"),
                conform(self.post_truth, "truth_post"),
            )
        if self.user_truth:
            storage.write_parquet(
                storage.join(self.out, "truth", "users", f"{part}.parquet"),
                conform(self.user_truth, "truth_user"),
            )
        self.lines, self.post_truth, self.user_truth = [], [], []
        self.shards += 1


def validate_config(config: SynthConfig) -> None:
    """Refuse a config that cannot produce what it asks for, with the reason."""
    problems = []
    if not config.out:
        problems.append("--out is required (a folder or s3:// URI)")
    if config.users < 1:
        problems.append("--users must be at least 1")
    if config.posts_per_shard < 1:
        problems.append("--posts-per-shard must be at least 1")
    if not 1 <= config.categories <= len(CATEGORIES):
        problems.append(f"--categories must be in 1..{len(CATEGORIES)}")
    if config.image_size < 8:
        problems.append("--image-size must be at least 8")
    if not 1 <= config.image_quality <= 100:
        problems.append("--image-quality must be in 1..100")
    if not 3 < config.caption_mean_words < 15 or not 3 < config.hashtag_mean_count < 15:
        problems.append("mean caption/hashtag lengths must lie inside (3, 15), the paper's filter")
    if not 1 <= config.posts_min <= config.posts_max:
        problems.append("need 1 <= posts_min <= posts_max")
    for name in RATE_FIELDS:
        value = getattr(config, name)
        if not 0.0 <= value <= 1.0:
            problems.append(f"{name} must be in [0, 1], got {value}")
    user_rates = (config.too_few_users_rate + config.too_many_users_rate
                  + config.spammer_users_rate)
    if user_rates > 1.0:
        problems.append("the *_users_rate knobs add up to more than 1")
    if config.short_caption_rate + config.long_caption_rate > 1.0:
        problems.append("short_caption_rate + long_caption_rate > 1")
    if config.short_hashtags_rate + config.long_hashtags_rate > 1.0:
        problems.append("short_hashtags_rate + long_hashtags_rate > 1")
    if problems:
        raise ValueError("bad synth config: " + "; ".join(problems))


def _prepare_output(config: SynthConfig) -> None:
    existing = [
        storage.join(config.out, sub) for sub in ("posts", "images", "truth")
        if storage.exists(storage.join(config.out, sub))
    ]
    if existing and not config.overwrite:
        raise FileExistsError(
            f"{config.out} already holds an archive ({', '.join(existing)}); "
            "pass --overwrite true to replace it"
        )
    for uri in existing:
        storage.delete(uri)


def write_archive(config: SynthConfig) -> dict[str, Any]:
    """Write the whole archive; returns the summary (also in ``truth/summary.json``)."""
    validate_config(config)
    _prepare_output(config)
    started = time.perf_counter()
    lengths = _Lengths(config)
    shards = _ShardWriter(config.out, config.posts_per_shard)
    users_by_kind: Counter[str] = Counter()
    noise: Counter[str] = Counter()
    broken_records: Counter[str] = Counter()
    broken_images: Counter[str] = Counter()
    posts = clean_posts = 0
    images = _ImageWriter(config.image_threads, limit=max(64, 16 * config.image_threads))
    try:
        for index in range(config.users):
            profile = make_user(config, index)
            users_by_kind[profile.kind] += 1
            shards.add_user(profile.truth_row(CATEGORIES))
            for post in iter_user_posts(config, profile, lengths):
                posts += 1
                truth = post.truth
                noise.update(truth["noise"])
                if truth["broken_record"]:
                    broken_records[truth["broken_record"]] += 1
                if truth["broken_image"]:
                    broken_images[truth["broken_image"]] += 1
                if not (truth["noise"] or truth["broken_record"] or truth["broken_image"]):
                    clean_posts += 1
                shards.add(post)
                if config.write_images and post.image_job is not None:
                    images.submit(post.image_job)
            if (index + 1) % 500 == 0:
                log.info("synth: %d/%d users, %d posts", index + 1, config.users, posts)
        shards.flush()
    finally:
        images.close()
    summary = {
        "out": config.out,
        "seed": config.seed,
        "users": config.users,
        "users_by_kind": dict(sorted(users_by_kind.items())),
        "posts": posts,
        "clean_posts": clean_posts,
        "noise": dict(sorted(noise.items())),
        "broken_records": dict(sorted(broken_records.items())),
        "broken_images": dict(sorted(broken_images.items())),
        "images_written": images.written,
        "shards": shards.shards,
        "config": config_to_dict(config),
    }
    # The summary file holds no timings so that the same seed gives the same bytes.
    storage.write_json(storage.join(config.out, "truth", "summary.json"), summary)
    elapsed = time.perf_counter() - started
    return {**summary, "seconds": round(elapsed, 3),
            "posts_per_second": round(posts / elapsed, 1) if elapsed > 0 else None}


def _yaml_section(path: str | None) -> str | None:
    """Use the ``synth:`` section of a multi-stage YAML file when it has one."""
    if not path:
        return None
    import yaml

    loaded = yaml.safe_load(storage.read_text(path)) or {}
    return "synth" if isinstance(loaded, dict) and isinstance(loaded.get("synth"), dict) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="csmn synth", description="Write a synthetic Instagram-like archive."
    )
    parser.add_argument("--config", help="YAML file of SynthConfig fields (or a synth: section)")
    add_config_arguments(parser, SynthConfig)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = config_from_args(
            SynthConfig, args, args.config, section=_yaml_section(args.config)
        )
        summary = write_archive(config)
    except (ValueError, FileExistsError) as err:
        print(f"csmn synth: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
