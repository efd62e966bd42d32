"""The special tokens every vocabulary starts with, and their ids (paper 4.1; section
"Vocabulary" of docs/method.md): ``_PAD``=0, ``_GO``=1, ``_EOS``=2, ``_UNK``=3, then words.

This is the one definition: the model, decoding, vocabularies and metrics all read it.
"""

from __future__ import annotations

from typing import Any

from csmn.data.names import HASHTAG

PAD, GO, EOS, UNK = "_PAD", "_GO", "_EOS", "_UNK"
SPECIAL_TOKENS = (PAD, GO, EOS, UNK)
PAD_ID, GO_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
# The first id that is a real word.
FIRST_WORD_ID = len(SPECIAL_TOKENS)
# Tokens a decoder must never emit: padding, the start marker, and "unknown" (a guess that
# is always wrong). ``_EOS`` ends a sequence and is never part of its words.
NEVER_EMITTED_IDS = (PAD_ID, GO_ID, UNK_ID)
# Markers that never belong to a scored prediction (``_UNK`` stays: it is a wrong guess).
MARKERS = frozenset({PAD, GO, EOS})

# What decoding does about repeated words (csmn.core.decoding). ``block`` forbids, while
# decoding, a hashtag a list already holds, and in a post text a word a third time in a row
# or a three-word phrase a second time: no tag list preprocessing keeps holds a tag twice,
# and a real caption hardly ever does either (none of the synthetic archive's holds a run of
# three, 0.5% of its training captions a phrase twice), while greedy decoding loops on them
# (``time for beach time for beach``: 28% of CSMN-P5's posts at 100 users, README).
# ``paper``: duplicate hashtags removed after decoding (4.2), post texts as decoded.
BLOCK, PAPER = "block", "paper"
REPEAT_RULES = (BLOCK, PAPER)
REPEATS_HELP = ("repeated words: block (no hashtag twice; no word 3 times in a row and no "
                "3-word phrase twice in a post; while decoding) | paper (duplicate hashtags "
                "removed after, 4.2)")
# The longest run of one word a post text may hold under ``block``.
POST_MAX_RUN = 2
# The shortest phrase a post text may not hold twice under ``block``.
POST_NO_REPEAT_NGRAM = 3


# When a sequence ends (csmn.core.decoding). ``paper`` (4.2): at the first step where _EOS is the
# most probable token. With many plausible words that rule ends lists early: _EOS only has to
# beat each word on its own, so a step that puts 3% on _EOS and 97% spread over 40 tags ends
# the list (the niche archive's tag lists: 3.3 tags decoded against 7.4 true ones). ``likely``
# asks the question the step answers: is ending more probable than going on? It ends at the
# first step where P(_EOS) >= 1/2 and otherwise takes the most probable word, _EOS left out.
LIKELY = "likely"
STOP_RULES = (LIKELY, PAPER)
STOP_HELP = ("when a sequence ends: likely (once P(_EOS) >= 1/2, else the best word) | paper "
             "(once _EOS is the most probable token, 4.2)")
LIKELY_EOS_THRESHOLD = 0.5


def task_rules(task: str, repeats: str = BLOCK, stop: str = LIKELY) -> dict[str, Any]:
    """The decoding options (``block_repeats``, ``dedupe_tokens``, ``max_run``,
    ``no_repeat_ngram``, ``eos_threshold``) of a task under a repeat rule and a stop rule
    (see above)."""
    if repeats not in REPEAT_RULES:
        raise ValueError(f"repeats must be one of {', '.join(REPEAT_RULES)}, got {repeats!r}")
    if stop not in STOP_RULES:
        raise ValueError(f"stop must be one of {', '.join(STOP_RULES)}, got {stop!r}")
    eos_threshold = LIKELY_EOS_THRESHOLD if stop == LIKELY else None
    if task == HASHTAG:
        return {"block_repeats": repeats == BLOCK, "dedupe_tokens": True, "max_run": None,
                "no_repeat_ngram": None, "eos_threshold": eos_threshold}
    blocking = repeats == BLOCK
    return {"block_repeats": False, "dedupe_tokens": False,
            "max_run": POST_MAX_RUN if blocking else None,
            "no_repeat_ngram": POST_NO_REPEAT_NGRAM if blocking else None,
            "eos_threshold": eos_threshold}
