"""The whole archive, streamed shard by shard, and the ``csmn synth`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from typing import Any

from csmn.config import add_config_arguments, config_from_args, config_to_dict
from csmn.data import storage
from csmn.data.schemas import conform
from csmn.synth.config import RATE_FIELDS, SynthConfig
from csmn.synth.images import ImageWriter
from csmn.synth.posts import Lengths, PlannedPost, iter_user_posts
from csmn.synth.users import make_user
from csmn.synth.vocabulary import CATEGORIES

log = logging.getLogger(__name__)


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
    if not config.posts_median > 0 or not config.posts_sigma >= 0:
        problems.append("need posts_median > 0 and posts_sigma >= 0 (a log-normal)")
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


# Written first: an archive whose writing was stopped is still known to be one.
_STARTED = "_started.json"


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
    # --overwrite replaces an archive this command wrote (finished, or stopped half way),
    # never folders of those names that something else keeps there (a photo folder images/).
    ours = [storage.join(config.out, "truth", name) for name in ("summary.json", _STARTED)]
    if existing and not any(storage.exists(uri) for uri in ours):
        raise FileExistsError(
            f"{config.out} holds {', '.join(existing)} but no truth/summary.json: not an "
            "archive csmn synth wrote, so --overwrite leaves it alone; choose another --out")
    for uri in existing:
        storage.delete(uri)
    storage.write_json(ours[1], {"config": config_to_dict(config)})


def write_archive(config: SynthConfig) -> dict[str, Any]:
    """Write the whole archive; returns the summary (also in ``truth/summary.json``)."""
    validate_config(config)
    _prepare_output(config)
    started = time.perf_counter()
    lengths = Lengths(config)
    shards = _ShardWriter(config.out, config.posts_per_shard)
    users_by_kind: Counter[str] = Counter()
    noise: Counter[str] = Counter()
    broken_records: Counter[str] = Counter()
    broken_images: Counter[str] = Counter()
    posts = clean_posts = 0
    images = ImageWriter(config.image_threads, limit=max(64, 16 * config.image_threads))
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="csmn synth", description="Write a synthetic Instagram-like archive."
    )
    parser.add_argument("--config", help="YAML file of SynthConfig fields (or a synth: section)")
    add_config_arguments(parser, SynthConfig)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        # The synth: section of a multi-stage YAML file, where it has one.
        config = config_from_args(SynthConfig, args, args.config, auto_section="synth")
        summary = write_archive(config)
    except (ValueError, FileExistsError) as err:
        print(f"csmn synth: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def hold_back_newest(archive: str, later: str, share: float) -> str | None:
    """Move the archive's newest posts (``share`` of its dated posts, by time) out of its
    posts files into the JSONL file ``later``: the slice that arrives after training, for the
    nightly job. Lines that are not a dated post (the noise) stay. Returns the cutoff time:
    every post held back was created at or after it, every post left before it."""
    files = {uri: storage.read_text(uri).splitlines()
             for uri in storage.list_files(storage.join(archive, "posts"), suffix=".jsonl")}
    dated = []
    for lines in files.values():
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("created_at"), str):
                dated.append((record["created_at"], line))
    if not dated or share <= 0:
        return None
    dated.sort()
    cutoff = dated[max(0, len(dated) - max(1, round(share * len(dated))))][0]
    held = {line for created, line in dated if created >= cutoff}
    for uri, lines in files.items():
        storage.write_text(uri, "".join(f"{line}\n" for line in lines if line not in held))
    storage.write_text(later, "".join(f"{line}\n" for line in sorted(held)))
    return cutoff
