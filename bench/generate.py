"""Nightly generation: posts/s of the batched path against a plain per-post loop, same models.

Two figures, both ratios measured in one run:

- features already present: decoding both models (hashtag and post) through the Predictor
  in batches, against one Predictor call per post (plain PyTorch, no Ray);
- features computed: ResNet-101 pool5 + both models per batch, against one image and one
  post at a time (plain PyTorch, no Ray);

and, with ``--job`` (needs Ray and MLflow; not on the GPU box), the whole ``csmn generate``
job on a synthetic archive: its posts/s against the per-post loop's.

    python bench/generate.py [--device cuda] [--posts 512] [--crop 224] [--job]

Goal (issue #13): batching at least 20x the per-post loop. On a GPU, also prints the
GPU-minutes a night of 1.1M new posts would take at the batched rate (goal: <= 10).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.timing import synchronize  # noqa: E402
from csmn.core.checkpoint import LoadedCheckpoint  # noqa: E402
from csmn.core.image_features import FeatureExtractor, build_resnet101_trunk  # noqa: E402
from csmn.core.model import CSMN, ModelConfig  # noqa: E402
from csmn.core.predictor import Predictor  # noqa: E402
from csmn.core.tokens import SPECIAL_TOKENS  # noqa: E402

NIGHTLY_POSTS = 1_100_000


def _predictor(task: str, vocab_size: int, device: str, batch_size: int) -> Predictor:
    """A paper-size CSMN (ModelConfig's defaults: D=60, 2048-d pool5) with random weights:
    the cost of a decoding step does not depend on what the weights learned. A batch decodes
    until its last post stops, so batching is never favoured by the stopping rule."""
    config = ModelConfig(vocab_size=vocab_size)
    torch.manual_seed(0)
    model = CSMN(config).eval()
    vocab = [*SPECIAL_TOKENS, *(f"w{i}" for i in range(vocab_size - len(SPECIAL_TOKENS)))]
    loaded = LoadedCheckpoint(model=model, model_config=config, vocab=vocab, task=task)
    return Predictor(loaded, device=device, batch_size=batch_size)


def _rate(fn, posts: int, device: torch.device) -> float:
    fn()  # warm-up
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return posts / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu | cuda (default: cuda when present)")
    parser.add_argument("--posts", type=int, default=256, help="posts per timed pass")
    parser.add_argument("--loop-posts", type=int, default=16,
                        help="posts the per-post loop times (it is slow)")
    parser.add_argument("--batch-size", type=int, default=256, help="posts per batch")
    parser.add_argument("--crop", type=int, default=224, help="image side (paper: 224)")
    parser.add_argument("--job", action="store_true", help="also time csmn generate (Ray)")
    args = parser.parse_args()
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    predictors = {task: _predictor(task, size, args.device, args.batch_size)
                  for task, size in (("hashtag", 60_000), ("post", 40_000))}
    features = rng.random((args.posts, 2048), dtype=np.float32)
    contexts = [[f"w{i}" for i in rng.integers(0, 1000, 60)] for _ in range(args.posts)]

    def decode_batched(n: int = args.posts) -> None:
        for predictor in predictors.values():
            predictor.predict(features[:n], contexts[:n])

    def decode_per_post(n: int = args.loop_posts) -> None:
        for i in range(n):
            for predictor in predictors.values():
                predictor.predict(features[i : i + 1], contexts[i : i + 1])

    batched = _rate(decode_batched, args.posts, device)
    loop = _rate(decode_per_post, args.loop_posts, device)
    print(f"features present ({args.device}): batched {batched:.1f} posts/s, per post "
          f"{loop:.1f} posts/s: {batched / loop:.1f}x (goal >= 20x)")

    extractor = FeatureExtractor(build_resnet101_trunk(None, 0), ("pool5",), args.device,
                                 "auto" if device.type == "cuda" else "fp32",
                                 (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), None)
    pixels = rng.integers(0, 255, (args.posts, args.crop, args.crop, 3), dtype=np.uint8)
    image_batch = 64

    def full_batched(n: int = args.posts) -> None:
        pooled = np.concatenate([extractor(pixels[i : i + image_batch])["pool5"]
                                 for i in range(0, n, image_batch)])
        for predictor in predictors.values():
            predictor.predict(pooled, contexts[:n])

    def full_per_post(n: int = args.loop_posts) -> None:
        for i in range(n):
            pooled = extractor(pixels[i : i + 1])["pool5"]
            for predictor in predictors.values():
                predictor.predict(pooled, contexts[i : i + 1])

    full = _rate(full_batched, args.posts, device)
    full_loop = _rate(full_per_post, args.loop_posts, device)
    print(f"features computed ({args.device}, {args.crop}px): batched {full:.1f} posts/s, "
          f"per post {full_loop:.1f} posts/s: {full / full_loop:.1f}x (goal >= 20x)")
    if device.type == "cuda":
        print(f"a night of {NIGHTLY_POSTS:,} new posts at the batched rate: "
              f"{NIGHTLY_POSTS / full / 60:.1f} GPU-minutes (goal <= 10)")
    if args.job:
        print(f"job: {_job_rate():.1f} posts/s for csmn generate end to end")
    return 0


def _job_rate() -> float:
    """csmn generate on a small synthetic archive with tiny trained-by-nobody champions is
    not the models above; the job's posts/s is its own figure, for the issue note."""
    import tempfile

    from csmn.experiments.demo import DemoConfig, run_demo

    with tempfile.TemporaryDirectory() as out:
        result = run_demo(DemoConfig(out=out, users=12, tasks=("hashtag",),
                                     hashtags_by_posts=False, epochs=1, nightly_share=0.2))
        return float(result["nightly"]["summary"]["posts_per_second"])


if __name__ == "__main__":
    raise SystemExit(main())
