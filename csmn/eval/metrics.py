"""Evaluation metrics of the paper (section 5.1), computed the way the authors computed them.

Post generation: BLEU-1..4, METEOR, CIDEr and ROUGE-L from pycocoevalcap (Java METEOR 1.5 and
the Stanford PTB tokenizer), one reference per post. Hashtag prediction: F1 between the
predicted and the ground-truth hashtag sets of each post, averaged over posts.

Emoji: the PTB tokenizer silently drops characters it cannot tokenize, emoji among them, so a
prediction that differs from its reference only in an emoji would score as an exact match. The
authors wrote each emoji as its escape text (``\\U0001f60d``) before scoring; so do we, in the
references and in the predictions alike, with two changes that keep an emoji one token in
every scorer: the backslashes are left out (PTB splits them off, and METEOR's normalizer splits
them off again, so that every emoji matched every other on a ``\\`` token), and an emoji of
several code points (``❤️``, a ZWJ family, a flag) is one token of all of them, as
preprocessing keeps it (``csmn.text.normalize.EMOJI_PATTERN``), so that a shared variation
selector or joiner is no match between two emoji.

CIDEr takes its document frequencies from the evaluated set itself: CIDEr of one post, or of
one user's few posts, is meaningless. CIDEr is therefore reported for a whole split only, never
per post or per user.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from csmn.core.tokens import MARKERS, POST_NO_REPEAT_NGRAM
from csmn.text.normalize import EMOJI_PATTERN, canonical_emoji

_METEOR_SEPARATOR = "|||"


def _escaped(chars: str) -> str:
    return "".join(f"u{ord(c):04x}" if ord(c) <= 0xFFFF else f"u{ord(c):08x}" for c in chars)


def _escaped_emoji(match: re.Match[str]) -> str:
    return f" {_escaped(canonical_emoji(match.group(0)))} "


def escape_emoji(text: str) -> str:
    """``text`` in ASCII for the Java scorers: each emoji one token of its code points' escape
    text without backslashes (``😍`` -> ``u0001f60d``, ``❤️`` -> ``u2764``, ``👨‍👩‍👧`` ->
    ``u0001f468u200du0001f469u200du0001f467``); any other non-ASCII character escaped in
    place; newlines become spaces (one line per post for Java)."""
    text = EMOJI_PATTERN.sub(_escaped_emoji, text.replace("\r", " ").replace("\n", " "))
    if text.isascii():
        return text
    return "".join(c if c.isascii() else _escaped(c) for c in text)


def ptb_tokenize(lines: Sequence[str]) -> list[str]:
    """pycocoevalcap's ``PTBTokenizer.tokenize`` (the same jar, flags and punctuation removed)
    for one text per line, the lines given on the tokenizer's standard input. Theirs writes
    every text to a temporary file inside the installed package, which a job must not write
    to (and cannot, where site-packages is read-only), and leaves it there when Java fails."""
    from pycocoevalcap.tokenizer import ptbtokenizer

    jar = os.path.join(os.path.dirname(os.path.abspath(ptbtokenizer.__file__)),
                       ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    command = ["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
               "-lowerCase"]
    if any("\n" in line or "\r" in line for line in lines):
        raise ValueError("one line per text: a text holds a line break")
    done = subprocess.run(command, input="\n".join(lines).encode(), capture_output=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the PTB tokenizer failed ({done.returncode}): "
                           f"{done.stderr.decode(errors='replace')[-500:]}")
    tokenized = done.stdout.decode().split("\n")
    if len(tokenized) < len(lines):
        raise RuntimeError(f"PTB tokenizer returned {len(tokenized)} of {len(lines)} lines")
    punctuation = set(ptbtokenizer.PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w not in punctuation)
            for line in tokenized[:len(lines)]]


def prediction_tokens(prediction: str | Sequence[str]) -> list[str]:
    """The tokens of a prediction (a space-joined string or a token list), markers removed."""
    tokens = prediction.split() if isinstance(prediction, str) else list(prediction)
    return [t for t in tokens if t and t not in MARKERS]


# --------------------------------------------------------------------------- post metrics


class CocoScorer:
    """pycocoevalcap's scorers with one METEOR JVM kept for every call of ``score``.

    METEOR's Java start-up takes seconds: create one scorer per job (or test module) and
    score whole splits with it. Use as a context manager, or call ``close``.
    """

    def __init__(self) -> None:
        self._meteor: Any = None

    @property
    def meteor(self) -> Any:
        if self._meteor is None:
            from pycocoevalcap.meteor.meteor import Meteor

            self._meteor = Meteor()
        return self._meteor

    def close(self) -> None:
        if self._meteor is not None:
            process = self._meteor.meteor_p
            process.stdin.close()
            process.kill()
            process.wait()
            self._meteor = None

    def __enter__(self) -> CocoScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def tokenize(self, texts: Sequence[str]) -> list[str]:
        """Emoji-escape then PTB-tokenize every text in ONE Java call; the order is kept."""
        return ptb_tokenize([escape_emoji(text) for text in texts])

    def score(self, references: Sequence[str], predictions: Sequence[str]) -> PostScores:
        """All post metrics of one split; one tokenizer and one METEOR request for all posts."""
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        if len(references) != len(predictions):
            raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
        if not references:
            raise ValueError("no posts to score")
        n = len(references)
        tokenized = self.tokenize(
            [*references, *[" ".join(prediction_tokens(p)) for p in predictions]])
        gts = {i: [tokenized[i].replace(_METEOR_SEPARATOR, " ")] for i in range(n)}
        res = {i: [tokenized[n + i].replace(_METEOR_SEPARATOR, " ")] for i in range(n)}
        bleu, bleu_per_post = Bleu(4).compute_score(gts, res, verbose=0)
        meteor, meteor_per_post = self.meteor.compute_score(gts, res)
        rouge, rouge_per_post = Rouge().compute_score(gts, res)
        cider, cider_per_post = Cider().compute_score(gts, res)
        return PostScores(
            bleu_1=float(bleu[0]),
            bleu_2=float(bleu[1]),
            bleu_3=float(bleu[2]),
            bleu_4=float(bleu[3]),
            meteor=float(meteor),
            cider=float(cider),
            rouge_l=float(rouge),
            n_posts=n,
            references_tokenized=[gts[i][0] for i in range(n)],
            predictions_tokenized=[res[i][0] for i in range(n)],
            bleu_per_post=np.asarray(bleu_per_post, dtype=np.float64).T,
            meteor_per_post=np.asarray(meteor_per_post, dtype=np.float64),
            rouge_l_per_post=np.asarray(rouge_per_post, dtype=np.float64),
            cider_per_post=np.asarray(cider_per_post, dtype=np.float64),
        )


@dataclass
class PostScores:
    """Split-level post metrics (the paper's Table 2 columns) and per-post details.

    ``cider`` exists for the split only: its document frequencies come from this split.
    The per-post arrays (sentence BLEU-1..4 as columns, METEOR, ROUGE-L) serve breakdowns.
    """

    bleu_1: float
    bleu_2: float
    bleu_3: float
    bleu_4: float
    meteor: float
    cider: float
    rouge_l: float
    n_posts: int
    references_tokenized: list[str] = field(repr=False)
    predictions_tokenized: list[str] = field(repr=False)
    bleu_per_post: np.ndarray = field(repr=False)
    meteor_per_post: np.ndarray = field(repr=False)
    rouge_l_per_post: np.ndarray = field(repr=False)
    # With the split's document frequencies (they come from the references alone, so two
    # models scored on the same split share them); their mean is the split's CIDEr.
    cider_per_post: np.ndarray = field(repr=False)

    def summary(self) -> dict[str, float | int]:
        return {
            "bleu_1": self.bleu_1,
            "bleu_2": self.bleu_2,
            "bleu_3": self.bleu_3,
            "bleu_4": self.bleu_4,
            "meteor": self.meteor,
            "cider": self.cider,
            "rouge_l": self.rouge_l,
            "n_posts": self.n_posts,
        }


def score_posts(
    references: Sequence[str],
    predictions: Sequence[str] | Sequence[Sequence[str]],
    scorer: CocoScorer | None = None,
) -> PostScores:
    """BLEU-1..4, METEOR, CIDEr (split-level only), ROUGE-L of one split, one reference each.

    Pass a ``CocoScorer`` to reuse its METEOR JVM across calls; without one, a scorer is
    started and closed for this call.
    """
    if scorer is not None:
        return scorer.score(references, predictions)  # type: ignore[arg-type]
    with CocoScorer() as own:
        return own.score(references, predictions)  # type: ignore[arg-type]


def corpus_bleu_1(
    references_tokenized: Sequence[str], predictions_tokenized: Sequence[str]
) -> float:
    """pycocoevalcap's corpus BLEU-1 over already tokenized texts (no Java involved)."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    scorer = BleuScorer(n=1)
    for reference, prediction in zip(references_tokenized, predictions_tokenized, strict=True):
        scorer += (prediction, [reference])
    score, _ = scorer.compute_score(option="closest", verbose=0)
    return float(score[0])


# ------------------------------------------------------------------------ hashtag metrics


def hashtag_set(tags: str | Iterable[str]) -> set[str]:
    """The set of hashtags of a post: ``#`` optional, case folded, markers dropped."""
    tokens = tags.split() if isinstance(tags, str) else tags
    out = set()
    for token in tokens:
        if not token or token in MARKERS:
            continue
        tag = token.lstrip("#").lower()
        if tag:
            out.add(tag)
    return out


def hashtag_prf(
    truth: str | Iterable[str], predicted: str | Iterable[str]
) -> tuple[float, float, float]:
    """(precision, recall, F1) of one post's predicted hashtag set against its true set.

    Duplicates count once; all three are 0 when either set is empty or they do not overlap.
    """
    truth_set, predicted_set = hashtag_set(truth), hashtag_set(predicted)
    hits = len(truth_set & predicted_set)
    if hits == 0:
        return 0.0, 0.0, 0.0
    precision = hits / len(predicted_set)
    recall = hits / len(truth_set)
    return precision, recall, 2 * precision * recall / (precision + recall)


@dataclass
class HashtagScores:
    """Per-post precision, recall and F1, averaged over the posts of the split (Table 3)."""

    precision: float
    recall: float
    f1: float
    n_posts: int
    precision_per_post: np.ndarray = field(repr=False)
    recall_per_post: np.ndarray = field(repr=False)
    f1_per_post: np.ndarray = field(repr=False)

    def summary(self) -> dict[str, float | int]:
        return {
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "n_posts": self.n_posts,
        }


def score_hashtags(
    truths: Sequence[str | Sequence[str]], predictions: Sequence[str | Sequence[str]]
) -> HashtagScores:
    if len(truths) != len(predictions):
        raise ValueError(f"{len(truths)} truths but {len(predictions)} predictions")
    if not truths:
        raise ValueError("no posts to score")
    prf = np.array([hashtag_prf(t, p) for t, p in zip(truths, predictions, strict=True)])
    return HashtagScores(
        precision=float(prf[:, 0].mean()),
        recall=float(prf[:, 1].mean()),
        f1=float(prf[:, 2].mean()),
        n_posts=len(truths),
        precision_per_post=prf[:, 0],
        recall_per_post=prf[:, 1],
        f1_per_post=prf[:, 2],
    )


# ------------------------------------------------------------- context use and breakdowns


def context_hits(
    predictions: Sequence[str | Sequence[str]], contexts: Sequence[Sequence[str]]
) -> tuple[np.ndarray, np.ndarray]:
    """Per post: (predicted tokens that are among the post's context words, predicted tokens).

    These are the coloured words of the paper's Figure 4: what the model took from the user's
    context memory. Tokens are compared exactly, as the vocabulary writes them.
    """
    if len(predictions) != len(contexts):
        raise ValueError(f"{len(predictions)} predictions but {len(contexts)} contexts")
    hits = np.zeros(len(predictions), dtype=np.int64)
    totals = np.zeros(len(predictions), dtype=np.int64)
    for i, (prediction, context) in enumerate(zip(predictions, contexts, strict=True)):
        tokens = prediction_tokens(prediction)
        context_set = set(context)
        hits[i] = sum(token in context_set for token in tokens)
        totals[i] = len(tokens)
    return hits, totals


def triple_repeat_share(predictions: Sequence[str | Sequence[str]]) -> float:
    """Share of predictions holding a word three times in a row (``so so so``): the failure
    of an undertrained language model that issue-level goals bound (below 5%)."""
    if not predictions:
        return 0.0
    tokens = [prediction_tokens(p) for p in predictions]
    runs = sum(any(a == b == c for a, b, c in zip(t, t[1:], t[2:], strict=False))
               for t in tokens)
    return runs / len(tokens)


def repeated_phrase_share(predictions: Sequence[str | Sequence[str]],
                          n: int = POST_NO_REPEAT_NGRAM) -> float:
    """Share of predictions holding an ``n``-word phrase twice (``time for beach time for
    beach``): a loop that the word-run count above does not see, and that ``--repeats block``
    forbids while decoding."""
    if not predictions:
        return 0.0
    looping = 0
    for prediction in predictions:
        tokens = prediction_tokens(prediction)
        phrases = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
        looping += len(set(phrases)) < len(phrases)
    return looping / len(predictions)


def context_share(
    predictions: Sequence[str | Sequence[str]], contexts: Sequence[Sequence[str]]
) -> float:
    """Share of all predicted tokens of a split that appear in their post's context words."""
    hits, totals = context_hits(predictions, contexts)
    total = int(totals.sum())
    return float(hits.sum()) / total if total else 0.0


@dataclass
class UserMetrics:
    """One user's numbers. No CIDEr here: it is meaningful per split only."""

    user_id: str
    n_posts: int
    context_share: float
    f1: float | None = None
    precision: float | None = None
    recall: float | None = None
    bleu_1: float | None = None
    rouge_l: float | None = None


def per_user_metrics(
    user_ids: Sequence[str],
    predictions: Sequence[str | Sequence[str]],
    contexts: Sequence[Sequence[str]],
    hashtags: HashtagScores | None = None,
    posts: PostScores | None = None,
) -> list[UserMetrics]:
    """Breakdown by user, most posts first: hashtag P/R/F1 averaged over the user's posts
    and/or corpus BLEU-1 and mean ROUGE-L over the user's posts, plus the context share."""
    n = len(user_ids)
    for name, scores in (("hashtags", hashtags), ("posts", posts)):
        if scores is not None and scores.n_posts != n:
            raise ValueError(f"{name} scores cover {scores.n_posts} posts, user_ids {n}")
    hits, totals = context_hits(predictions, contexts)
    rows_of: dict[str, list[int]] = defaultdict(list)
    for i, user_id in enumerate(user_ids):
        rows_of[str(user_id)].append(i)
    out = []
    for user_id, rows in rows_of.items():
        index = np.asarray(rows)
        total = int(totals[index].sum())
        metrics = UserMetrics(
            user_id=user_id,
            n_posts=len(rows),
            context_share=float(hits[index].sum()) / total if total else 0.0,
        )
        if hashtags is not None:
            metrics.f1 = float(hashtags.f1_per_post[index].mean())
            metrics.precision = float(hashtags.precision_per_post[index].mean())
            metrics.recall = float(hashtags.recall_per_post[index].mean())
        if posts is not None:
            metrics.bleu_1 = corpus_bleu_1(
                [posts.references_tokenized[i] for i in rows],
                [posts.predictions_tokenized[i] for i in rows],
            )
            metrics.rouge_l = float(posts.rouge_l_per_post[index].mean())
        out.append(metrics)
    out.sort(key=lambda m: (-m.n_posts, m.user_id))
    return out


# ------------------------------------------------------------------- per-post scores

# The per-post score of each metric a promotion can be decided on, by task.
PER_POST_METRICS = {
    "hashtag": ("f1", "precision", "recall"),
    "post": ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider"),
}


def per_post_scores(
    task: str,
    truths: Sequence[str],
    predictions: Sequence[str | Sequence[str]],
    scorer: CocoScorer | None = None,
) -> dict[str, np.ndarray]:
    """Every per-post score of the task at once (one scoring pass): hashtag F1, P and R of
    each post, or the post metrics computed sentence by sentence (CIDEr with the split's
    document frequencies)."""
    if task == "hashtag":
        scores = score_hashtags(truths, predictions)
        return {m: getattr(scores, f"{m}_per_post") for m in PER_POST_METRICS[task]}
    posts = score_posts(truths, predictions, scorer=scorer)
    out = {f"bleu_{n}": posts.bleu_per_post[:, n - 1] for n in range(1, 5)}
    out.update(meteor=posts.meteor_per_post, rouge_l=posts.rouge_l_per_post,
               cider=posts.cider_per_post)
    return out
