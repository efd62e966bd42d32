"""The word tables of the archive: 27 categories (the paper crawled 27 Pinterest categories,
section 3.1), the niches inside them, tags and emoji everybody uses, and the foreign and
advertising words the noise plants.

Every word a clean caption can contain passes PyEnchant's en_US check in lower case (the tests
check it), so only planted noise trips the language filter of section 3.1.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime


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
# (tests/synth/test_synth.py checks it), so only planted noise trips the language filter.
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

# --------------------------------------------------------------------------------------------
# Niches: groups of users inside a category who share a pool of hashtags and words.


@dataclass(frozen=True)
class Niche:
    """A community inside a category (sourdough bakers inside food): its tags and words.

    Its members write its hashtags and words, each with their own preferences over them; its
    images are those of its category, so only a user's words can tell the niche."""

    name: str
    category: int  # index into CATEGORIES
    words: tuple[str, ...]  # caption nouns, all in en_US
    hashtags: tuple[str, ...]  # the pool, most common first


# (category, tag stem, caption words). Three niches per category; the stems and words are
# the kind Instagram communities use, the words all pass en_US.
_NICHE_TABLE: tuple[tuple[str, str, str], ...] = (
    ("food", "sourdough", "sourdough loaf crust flour starter crumb"),
    ("food", "plantbased", "vegan tofu lentils kale chickpeas quinoa"),
    ("food", "lowandslow", "brisket ribs smoker charcoal embers rub"),
    ("coffee", "latteart", "pitcher tulip swan heart milk pour"),
    ("coffee", "matchalove", "green whisk ceremony powder bamboo"),
    ("coffee", "mixology", "bartender bitters shaker garnish gin"),
    ("travel", "vanlife", "van campsite dashboard highway road"),
    ("travel", "backpacker", "hostel budget bus border rucksack"),
    ("travel", "luxurytravel", "suite resort lounge champagne butler"),
    ("beach", "longboarding", "board wax swell reef lineup"),
    ("beach", "shelling", "conch driftwood seashells starfish pier"),
    ("beach", "sailinglife", "sailboat deck mast anchor harbor"),
    ("fashion", "thrifted", "thrift secondhand rack bargain flea"),
    ("fashion", "streetwear", "hoodie sneakers cap graphic hype"),
    ("fashion", "bohostyle", "fringe kimono sandals feathers tassels"),
    ("menswear", "beardgang", "beard oil balm comb trim"),
    ("menswear", "watchcollector", "dial strap bezel chronograph wristwatch"),
    ("menswear", "tailormade", "tailor lapel cuff tweed waistcoat"),
    ("beauty", "nailartist", "gel glitter acrylic manicure stamping"),
    ("beauty", "curlyhairgirl", "curls spray coils ringlets frizz"),
    ("beauty", "kbeautyroutine", "essence toner mask sheet serum"),
    ("fitness", "powerlifting", "platform barbell plates chalk bench"),
    ("fitness", "trailrunner", "trail ridge mud miles switchbacks"),
    ("fitness", "calisthenics", "bar handstand dips rings bars"),
    ("wellness", "acroyogis", "partner balance flight base trust"),
    ("wellness", "breathwork", "lungs exhale inhale stillness breath"),
    ("wellness", "ayurvedic", "turmeric ghee ginger tonic ritual"),
    ("dogs", "goldenretriever", "retriever fetch tennis ball pond"),
    ("dogs", "frenchbulldog", "bulldog snoring wrinkles snout ears"),
    ("dogs", "dogagility", "agility tunnel hurdles weave ribbon"),
    ("cats", "adoptdontshop", "rescue shelter foster adoption kennel"),
    ("cats", "blackcatsrule", "panther spooky eyes shadow midnight"),
    ("cats", "mainecoons", "giant mane tufts fur majestic"),
    ("nature", "birdwatching", "binoculars warbler heron feeder owl"),
    ("nature", "mushroomhunting", "mushrooms fungi spores forage morels"),
    ("nature", "stargazing", "telescope galaxy constellation moon comet"),
    ("hiking", "thruhiker", "shelter blaze resupply mileage permit"),
    ("hiking", "bouldering", "boulder crimp pad holds problem"),
    ("hiking", "peakbagger", "ridge cairn elevation scramble altitude"),
    ("gardening", "houseplantclub", "leaves vines fern philodendron terrarium"),
    ("gardening", "bonsaitree", "bonsai wire moss juniper trunk"),
    ("gardening", "allotmentlife", "allotment potatoes beans shed rhubarb"),
    ("home", "tinyhouseliving", "loft ladder nook compact trailer"),
    ("home", "minimalisthome", "storage space white calm simple"),
    ("home", "farmhousestyle", "wood barn mason jars galvanized"),
    ("architecture", "brutalist", "slab monolith concrete raw bunker"),
    ("architecture", "gothicarchitecture", "spires gargoyles vaults buttress stained"),
    ("architecture", "artdecobuildings", "gold ornament brass terrazzo chevron"),
    ("art", "urbansketchers", "sketchbook pen street corner fountain"),
    ("art", "oilpaintings", "oils palette knife impasto easel"),
    ("art", "moderncalligraphy", "lettering nib script flourish ink"),
    ("crafts", "amigurumi", "crochet hook stuffing plush bunny"),
    ("crafts", "woodworker", "lathe chisel walnut oak sawdust"),
    ("crafts", "quilters", "quilt patchwork batting binding squares"),
    ("books", "fantasyreads", "dragons magic quest kingdom sword"),
    ("books", "poetrycommunity", "poem verse stanza haiku rhyme"),
    ("books", "mysterylovers", "detective clue suspect murder alibi"),
    ("music", "vinylcollector", "turntable sleeve crate pressing needle"),
    ("music", "jazzlife", "saxophone trumpet swing quartet bass"),
    ("music", "synthwave", "synth neon retro arcade tape"),
    ("cars", "jdmlife", "tuner drift exhaust intake boost"),
    ("cars", "classiccar", "chrome restoration fins hubcaps carburetor"),
    ("cars", "offroading", "jeep winch mud rocks lift"),
    ("sports", "tennislife", "racket serve ace volley baseline"),
    ("sports", "cyclinglife", "bike climbs saddle cadence helmet"),
    ("sports", "golflife", "putt fairway birdie caddie tee"),
    ("family", "homeschooling", "lessons workbook science curriculum crafts"),
    ("family", "twinmama", "twins double stroller matching naps"),
    ("family", "dadlife", "dad barbecue tools lawn jokes"),
    ("weddings", "elopement", "cliff sunrise vows intimate mountain"),
    ("weddings", "rusticwedding", "barn lanterns burlap hay twine"),
    ("weddings", "bridesquad", "bridesmaids robes toast gowns squad"),
    ("holidays", "pumpkinpatch", "pumpkins cider hayride scarecrow apples"),
    ("holidays", "christmasmarkets", "market mulled stalls gingerbread wreath"),
    ("holidays", "newyearseve", "countdown midnight confetti champagne toast"),
    ("photography", "filmisnotdead", "grain roll darkroom negatives analog"),
    ("photography", "astrophotography", "milky exposure tripod stars night"),
    ("photography", "streetphotographers", "candid crowd alley commuter umbrella"),
    ("tech", "mechanicalkeyboards", "keys switches keyboard typing clicks"),
    ("tech", "retrogamer", "cartridge arcade pixel joystick console"),
    ("tech", "homelabber", "server rack cables router fans"),
)
# Endings of the derived niche tags (#sourdoughclub, #sourdoughlife...), picked per niche.
_NICHE_SUFFIXES: tuple[str, ...] = (
    "club", "life", "gram", "daily", "crew", "nation", "addict", "vibes", "community",
    "lovers", "goals", "squad", "love", "world", "society", "tribe",
)


def _niche_tags(index: int, stem: str, words: tuple[str, ...], taken: set[str]) -> tuple[str, ...]:
    """The pool of one niche: its stem, the stem with five endings, six word compounds.

    A tag another niche, a category or the global list already holds is skipped: every niche
    tag belongs to exactly one niche, so the truth can say which niche a post's tags are from.
    """
    n = len(_NICHE_SUFFIXES)
    endings = [_NICHE_SUFFIXES[(7 * index + k * 5) % n] for k in range(8)]
    candidates = [stem] + [stem + e for e in endings[:5]] + [
        words[0] + words[1], words[2] + endings[5], words[1] + words[3], words[3] + endings[6],
        words[4] + words[0], words[4] + endings[7],
    ]
    pool = []
    for body in candidates:
        tag = "#" + body
        if tag not in taken:
            taken.add(tag)
            pool.append(tag)
    return tuple(pool)


def _build_niches() -> tuple[Niche, ...]:
    by_name = {c.name: i for i, c in enumerate(CATEGORIES)}
    taken = set(GLOBAL_TAGS)
    for category in CATEGORIES:
        taken.update(category.hashtags)
    niches = []
    for index, (category, stem, words) in enumerate(_NICHE_TABLE):
        split = tuple(words.split())
        niches.append(Niche(stem, by_name[category], split, _niche_tags(index, stem, split, taken)))
    return tuple(niches)


NICHES: tuple[Niche, ...] = _build_niches()
# Niche indices per category index.
NICHES_BY_CATEGORY: tuple[tuple[int, ...], ...] = tuple(
    tuple(i for i, n in enumerate(NICHES) if n.category == c) for c in range(len(CATEGORIES))
)


def english_vocabulary() -> set[str]:
    """Every word a clean caption can be made of (all pass en_US, see the tests)."""
    words: set[str] = set(FUNCTION_WORDS) | set(GENERAL_ADJECTIVES) | set(NAMES)
    for phrase in OPENERS + CLOSERS:
        words.update(phrase.split())
    for category in CATEGORIES:
        words.update(category.nouns + category.adjectives + category.verbs)
    for niche in NICHES:
        words.update(niche.words)
    return words
