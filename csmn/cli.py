"""The ``csmn`` command: one subcommand per stage, each the same as its ``jobs/*.py`` entry."""

from __future__ import annotations

import importlib
import sys

# subcommand -> module with a ``main(argv) -> int``; imported lazily so `csmn synth` does not
# pay for torch and Ray.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("csmn.synth", "write a synthetic Instagram-like archive"),
    "preprocess": ("csmn.pipeline.preprocess",
                   "filter, normalize, build vocabularies, contexts, splits"),
    "extract-features": ("csmn.pipeline.extract",
                         "ResNet-101 pool5/res5c features for every image"),
    "train": ("csmn.pipeline.train", "train CSMN on Ray Train, tracked in MLflow"),
    "evaluate": ("csmn.pipeline.evaluate", "metrics, baselines and a report over a split"),
    "promote": ("csmn.pipeline.promote", "move @champion to a version that beats it"),
    "generate": ("csmn.pipeline.generate",
                 "the nightly job: hashtags and post text for every new post"),
    "ablation": ("csmn.experiments.ablation",
                 "the paper's Tables 2/3: train and evaluate the CSMN variants"),
    "demo": ("csmn.experiments.demo", "run the whole pipeline on the embedded default"),
}


def _usage() -> str:
    lines = ["usage: csmn <command> [options]", "", "commands:"]
    lines += [f"  {name:<18}{help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"csmn: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        print(f"csmn {name}: not built yet in this version", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
