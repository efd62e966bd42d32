"""``csmn promote``: move ``champion`` to a candidate version only when it beats the champion.

Both models are evaluated on the same split of the same data root by the evaluation job
(an earlier evaluation run of the model, split and data digest is reused), scored post by
post on the posts both predicted, and compared by a paired bootstrap (csmn.eval.bootstrap):
the candidate wins when the lower end of the interval of the mean per-post gain, at
``--confidence``, exceeds ``--min-gain``. The first version becomes champion when there is
none. Every decision is tagged on both versions and logged as a run of the
``csmn-promotion`` experiment; each move of the alias is recorded, so ``--rollback`` can move
it back.

Refusals (exit code 2, nothing changed): a missing model, version or alias; a candidate whose
vocabulary or context size differs from the data root's; a candidate trained on features of
random ResNet weights, unless ``--allow-random-features`` (then written on the version).

Two promotions at once: the alias is read again after the evaluations, just before it is
set; when another promotion moved it meanwhile, the candidate is compared again with the new
champion, so ``champion`` never ends on a model that lost its comparison.
"""

from __future__ import annotations

import json
import logging
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import pyarrow.compute as pc

from csmn import tracking
from csmn.config import config_from_args, config_parser
from csmn.core.checkpoint import read_metadata
from csmn.data import layout, storage
from csmn.data.completeness import require_data_root
from csmn.eval.bootstrap import paired_bootstrap
from csmn.eval.metrics import PER_POST_METRICS, CocoScorer, per_post_scores
from csmn.eval.report import MODEL_METHOD
from csmn.tracking import promotion as registry
from csmn.tracking import resolve_tracking_uri

log = logging.getLogger(__name__)

TASK_OF_MODEL = {name: task for task, name in layout.REGISTERED_MODEL_NAMES.items()}
DEFAULT_METRIC = {layout.HASHTAG: "f1", layout.POST: "meteor"}
# How often a candidate is compared again when other promotions keep moving the alias.
MAX_COMPARISONS = 5
Refused = registry.Refused


@dataclass
class PromoteConfig:
    name: str = field(default="csmn-hashtag", metadata={
        "help": f"registered model: {' | '.join(TASK_OF_MODEL)}"})
    candidate: str = field(default="latest", metadata={"help": "VERSION | latest"})
    data: str = field(default="", metadata={"help": "data root both models are evaluated on"})
    split: str = field(default="test", metadata={
        "help": "test | val | test_by_posts | val_by_posts"})
    metric: str = field(default="", metadata={
        "help": "per-post metric: hashtags f1 (default) | precision | recall; posts meteor "
                "(default) | bleu_1..bleu_4 | rouge_l | cider"})
    min_gain: float = field(default=0.0, metadata={
        "help": "the interval's lower end must exceed this gain"})
    confidence: float = field(default=0.95, metadata={"help": "of the bootstrap interval"})
    resamples: int = field(default=10_000, metadata={"help": "bootstrap resamples"})
    seed: int = field(default=0, metadata={"help": "bootstrap seed"})
    dry_run: bool = field(default=False, metadata={
        "help": "print the decision; no alias, tag or history is changed (an evaluation it "
                "needs is still run and logged)"})
    rollback: bool = field(default=False, metadata={
        "help": "move champion back to the previous champion"})
    allow_random_features: bool = field(default=False, metadata={
        "help": "promote a model trained on features of random ResNet weights"})

    def __post_init__(self) -> None:
        if self.name not in TASK_OF_MODEL:
            raise ValueError(f"--name must be one of {', '.join(TASK_OF_MODEL)}, got {self.name!r}")
        self.metric = self.metric or DEFAULT_METRIC[self.task]
        if self.metric not in PER_POST_METRICS[self.task]:
            raise ValueError(f"--metric for {self.name}: one of "
                             f"{', '.join(PER_POST_METRICS[self.task])}, got {self.metric!r}")
        layout.check_split(self.split)
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"--confidence must lie in (0, 1), got {self.confidence}")

    @property
    def task(self) -> str:
        return TASK_OF_MODEL[self.name]


# ------------------------------------------------------------------------------ checks


def check_candidate(config: PromoteConfig, version: Any, random_features: bool,
                    work_dir: str) -> None:
    """Refuse a candidate that does not fit the data root, or that learned from random
    image features without leave."""
    metadata = read_metadata(tracking.resolve_checkpoint(
        f"models:/{config.name}/{version.version}", resolve_tracking_uri(config.data), work_dir))
    vocab = storage.read_json(layout.vocab_uri(config.data, config.task, config.split))["tokens"]
    if metadata["vocab"] != vocab:
        raise Refused(f"{config.name} v{version.version}: its vocabulary "
                      f"({len(metadata['vocab'])} tokens) differs from the data root's "
                      f"({len(vocab)}): it was trained on another data root")
    manifest = storage.read_json(layout.manifest_uri(config.data))
    root_context = (manifest.get("config") or {}).get("context_size")
    model_context = metadata["model_config"]["context_size"]
    if root_context is not None and int(root_context) < int(model_context):
        raise Refused(f"{config.name} v{version.version}: context size {model_context}, but the "
                      f"data root's contexts hold {root_context} words")
    if random_features and not config.allow_random_features:
        raise Refused(f"{config.name} v{version.version} was trained on features of random "
                      "ResNet-101 weights: pass --allow-random-features to promote it anyway")


# ------------------------------------------------------------------------------ scoring


def _predictions(config: PromoteConfig, client: Any, version: Any, digest: str,
                 work_dir: str) -> dict[tuple[str, str], str]:
    """(user, post) -> the version's prediction on the split: from its latest evaluation run
    of this split and data digest, else from a new evaluation."""
    from csmn.pipeline.evaluate import EvaluateConfig, evaluate

    evaluation = EvaluateConfig(data=config.data, model=f"models:/{config.name}/{version.version}",
                                task=config.task, split=config.split, baselines="none")
    found = tracking.find_evaluation(resolve_tracking_uri(config.data), config.name,
                                     version.version, config.split, digest,
                                     evaluation.decoding, data_root=config.data)
    if found is not None:
        log.info("%s v%s: reusing evaluation run %s", config.name, version.version, found.run_id)
        table = storage.read_parquet(
            registry.download_predictions(client, found.run_id, work_dir))
    else:
        report = evaluate(evaluation)
        table = storage.read_parquet(storage.join(report["out"], "predictions.parquet"))
    table = table.filter(pc.equal(table.column("method"), MODEL_METHOD))
    return {(u, p): text for u, p, text in zip(
        table.column("user_id").to_pylist(), table.column("post_id").to_pylist(),
        table.column("prediction").to_pylist(), strict=True)}


def _truths(config: PromoteConfig) -> dict[tuple[str, str], str]:
    table = storage.read_parquet(layout.examples_dir(config.data, config.task, config.split),
                                 columns=["user_id", "post_id", "text"])
    return {(u, p): t for u, p, t in zip(table.column("user_id").to_pylist(),
                                         table.column("post_id").to_pylist(),
                                         table.column("text").to_pylist(), strict=True)}


def compare(config: PromoteConfig, candidate: dict, champion: dict,
            truths: dict) -> dict[str, Any]:
    """The paired bootstrap over the posts both models predicted."""
    keys = sorted(set(candidate) & set(champion) & set(truths))
    if not keys:
        raise Refused("the candidate and the champion predicted no post in common")
    reference = [truths[k] for k in keys]
    with CocoScorer() if config.task == layout.POST else nullcontext() as scorer:
        scores = {side: per_post_scores(config.task, reference, [predicted[k] for k in keys],
                                        scorer=scorer)
                  for side, predicted in (("candidate", candidate), ("champion", champion))}
    extra = {}
    if config.task == layout.POST and config.metric != "cider":
        # CIDEr only means something over a split: reported beside the gate's metric.
        extra = {f"{side}_cider": float(scores[side]["cider"].mean()) for side in scores}
    result = paired_bootstrap(scores["candidate"][config.metric],
                              scores["champion"][config.metric], config.confidence,
                              config.min_gain, config.resamples, config.seed)
    return {**result.as_dict(), **extra}


# ------------------------------------------------------------------------------ the gate


def _judge(config: PromoteConfig, client: Any, current: Any, mine: dict, truths: dict,
           digest: str, work_dir: str) -> dict[str, Any]:
    """The candidate's predictions against those of ``current`` (None: no champion yet)."""
    if current is None:
        return {"decision": "promoted", "reason": "no champion yet", "comparison": {}}
    theirs = _predictions(config, client, current, digest, work_dir)
    comparison = compare(config, mine, theirs, truths)
    won = comparison["wins"]
    return {"decision": "promoted" if won else "refused", "comparison": comparison,
            "reason": (f"the {config.confidence:.0%} interval of the {config.metric} gain "
                       f"[{comparison['low']:.4f}, {comparison['high']:.4f}] "
                       f"{'clears' if won else 'does not clear'} the minimum gain "
                       f"{config.min_gain}")}


def _record(config: PromoteConfig, client: Any, candidate: str, decision: dict[str, Any]) -> None:
    """Tags on both versions, then the alias: called with the promotion lock held."""
    against = decision["champion"]
    registry.tag_decision(client, config.name, candidate, against, {
        k: decision[k] for k in ("decision", "candidate", "champion", "metric", "data_digest",
                                 "split", "at", "reason")} | {
        "interval": [decision["comparison"].get("low"), decision["comparison"].get("high")]})
    if decision["decision"] == "promoted":
        if config.allow_random_features and decision["random_features"]:
            registry.tag_version(client, config.name, candidate,
                                 {"csmn.promoted_with_random_features": "true"})
        registry.move_champion(client, config.name, candidate, against, "promote")


def promote(config: PromoteConfig) -> dict[str, Any]:
    """Decide, record and (unless a dry run) move the alias; returns the decision.

    The comparison runs without a lock (it is the slow part); the champion is read again
    under the registry's promotion lock, and the decision is recorded there only when it is
    still the version the candidate was compared with. Otherwise the candidate is compared
    again with the new champion."""
    if not config.data:
        raise ValueError("--data is required: the data root both models are evaluated on")
    if not config.rollback:  # a rollback moves the alias only
        require_data_root(config.data, "promote")
    tracking_uri = resolve_tracking_uri(config.data)
    client = registry.open_client(tracking_uri)
    if config.rollback:
        return _rollback(config, client)
    candidate = registry.model_version(client, config.name, config.candidate)
    number = str(candidate.version)
    digest = layout.data_digest(config.data)
    base = {"model": config.name, "candidate": number, "metric": config.metric,
            "min_gain": config.min_gain, "confidence": config.confidence,
            "split": config.split, "data": config.data, "data_digest": digest,
            "random_features": registry.uses_random_features(client, candidate),
            "random_features_allowed": config.allow_random_features, "dry_run": config.dry_run}
    with tempfile.TemporaryDirectory(prefix="csmn-promote-") as work_dir:
        check_candidate(config, candidate, base["random_features"], work_dir)
        truths = _truths(config)
        mine = _predictions(config, client, candidate, digest, work_dir)
        for _ in range(MAX_COMPARISONS):
            current = registry.champion(client, config.name)
            if current is None:
                registry.check_first_champion(client, config.name)
            against = str(current.version) if current else None
            if against == number:
                raise Refused(f"{config.name} v{number} is already the champion")
            decision = {**base, **_judge(config, client, current, mine, truths, digest,
                                         work_dir), "champion": against, "at": registry.now()}
            if config.dry_run:
                return decision
            with registry.promotion_lock(client, config.name):
                now = registry.champion(client, config.name)
                if (str(now.version) if now else None) == against:
                    _record(config, client, number, decision)
                    break
            log.info("champion moved to %s during the comparison: comparing again",
                     f"v{now.version}" if now else "none (the alias was removed)")
        else:
            raise Refused(f"champion of {config.name} kept moving: {MAX_COMPARISONS} comparisons")
    decision["mlflow_run_id"] = registry.log_promotion_run(
        tracking_uri, config.name, decision, render_markdown(decision))
    return decision


def _rollback(config: PromoteConfig, client: Any) -> dict[str, Any]:
    if config.dry_run:
        target, current = registry.rollback_target(client, config.name)
        return {"decision": "rollback", "model": config.name, "champion": target,
                "previous": current, "dry_run": True}
    entry = registry.rollback(client, config.name)
    return {"decision": "rollback", "model": config.name, "champion": entry["version"],
            "previous": entry["previous"], "at": entry["at"], "dry_run": False}


def render_markdown(decision: dict[str, Any]) -> str:
    comparison = decision.get("comparison") or {}
    lines = [f"# Promotion of {decision['model']} v{decision['candidate']}", "",
             f"- decision: **{decision['decision']}** ({decision['reason']})",
             f"- against: {'v' + decision['champion'] if decision['champion'] else 'no champion'}",
             f"- data: {decision['data']} (digest {decision['data_digest']}), "
             f"split {decision['split']}"]
    if comparison:
        lines += ["", f"| | {decision['metric']} (mean per post) |", "|---|---|",
                  f"| candidate | {comparison['candidate_mean']:.4f} |",
                  f"| champion | {comparison['champion_mean']:.4f} |",
                  f"| gain | {comparison['mean_difference']:+.4f}, "
                  f"{decision['confidence']:.0%} interval [{comparison['low']:+.4f}, "
                  f"{comparison['high']:+.4f}] over {comparison['n_posts']} posts |"]
        if "candidate_cider" in comparison:
            lines.append(f"| CIDEr (split) | {comparison['candidate_cider']:.4f} vs "
                         f"{comparison['champion_cider']:.4f} |")
    return "\n".join(lines) + "\n"


def summary_line(decision: dict[str, Any]) -> str:
    if decision["decision"] == "rollback":
        return (f"{decision['model']}: champion rolled back to v{decision['champion']} "
                f"(was v{decision['previous']})" + (" [dry run]" if decision["dry_run"] else ""))
    comparison = decision.get("comparison") or {}
    interval = (f"; {decision['metric']} gain {comparison['mean_difference']:+.4f}, "
                f"{decision['confidence']:.0%} CI [{comparison['low']:+.4f}, "
                f"{comparison['high']:+.4f}], n={comparison['n_posts']}" if comparison else "")
    moved = " [dry run: nothing changed]" if decision["dry_run"] else ""
    against = f"v{decision['champion']}" if decision["champion"] else "no champion"
    return (f"{decision['model']} v{decision['candidate']} vs {against}: "
            f"{decision['decision']}{interval}{moved}")


def build_parser():
    return config_parser(PromoteConfig, "csmn promote", __doc__.split("\n")[0])


def main(argv: list[str] | None = None) -> int:
    from csmn.pipeline.runtime import setup_logging

    setup_logging("WARNING")
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(PromoteConfig, args, args.config_file)
        decision = promote(config)
    except (Refused, ValueError, FileNotFoundError) as err:
        print(f"csmn promote: refused: {err}", flush=True)
        return 2
    print(summary_line(decision))
    print(json.dumps(decision, indent=2, default=str))
    return 0
