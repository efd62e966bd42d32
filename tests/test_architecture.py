"""The architecture the README promises, checked on the source: the model runs without Ray
or MLflow (csmn.core), Ray lives in csmn.pipeline alone, MLflow in csmn.tracking alone, and
no module of csmn imports itself back through others."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "csmn"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> list[str]:
    """Every module an import statement names, at any depth (lazy imports count too)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            # ``from csmn.data import layout`` imports the module csmn.data.layout
            names += [f"{node.module}.{a.name}" for a in node.names
                      if f"{node.module}.{a.name}" in MODULES]
    return names


def _importers_of(top: str) -> set[str]:
    return {name for name, path in MODULES.items()
            if any(i == top or i.startswith(top + ".") for i in _imports(path))}


def test_ray_only_in_pipeline():
    outside = sorted(m for m in _importers_of("ray") if not m.startswith("csmn.pipeline"))
    assert outside == [], f"modules outside csmn.pipeline import Ray: {outside}"


def test_mlflow_only_in_tracking():
    outside = sorted(m for m in _importers_of("mlflow") if not m.startswith("csmn.tracking"))
    assert outside == [], f"modules outside csmn.tracking import MLflow: {outside}"


def _import_with_blocked(modules: list[str], blocked: tuple[str, ...], why: str) -> None:
    """Import ``modules`` in a fresh interpreter where importing any of the ``blocked``
    packages fails with ``why``; and none of them may be loaded at the end (a library that
    swallowed the ImportError would hide it otherwise)."""
    script = (
        "import importlib, sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {blocked!r}:\n"
        f"            raise ImportError(f'{{name}}: ' + {why!r})\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"loaded = [m for m in sys.modules if m.split('.')[0] in {blocked!r}]\n"
        "assert not loaded, loaded[:5]\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stderr[-3000:]


def test_core_imports_with_ray_and_mlflow_blocked():
    core = sorted(m for m in MODULES if m == "csmn.core" or m.startswith("csmn.core."))
    assert len(core) >= 6
    _import_with_blocked(core, ("ray", "mlflow"), "blocked: csmn.core must not need it")


# Modules whose functions Ray Data runs in CPU tasks (reading, joining, decoding images,
# planning), and the evaluation's, kept as light: a task's worker process imports the module
# to unpickle the function, so torch at their top costs every fresh worker about 3 s (a
# nightly run of 74 posts: 24 s before csmn.core.image_decode was split off, 11 s after).
# Imports inside the task functions are not seen here.
RAY_DATA_TASK_MODULES = [
    "csmn.pipeline.preprocess", "csmn.pipeline.extract", "csmn.pipeline.generate",
    "csmn.pipeline.evaluate", "csmn.pipeline.train_data", "csmn.core.image_decode",
    "csmn.data.readers", "csmn.text.history", "csmn.eval.baselines", "csmn.eval.metrics",
]


def test_ray_data_task_modules_import_without_torch():
    _import_with_blocked(RAY_DATA_TASK_MODULES, ("torch", "torchvision", "mlflow"),
                         "imported at the top of a module whose functions run in Ray Data "
                         "tasks")


def test_no_import_cycles():
    graph = {name: {i for i in _imports(path) if i in MODULES and i != name}
             for name, path in MODULES.items()}
    # a package's __init__ that re-exports its submodules is not a cycle with them
    for name in graph:
        graph[name] = {i for i in graph[name] if not name.startswith(i + ".")}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == [], f"import cycles: {cycles}"


def test_jobs_are_thin_entry_points():
    for job in sorted((REPO / "jobs").glob("*.py")):
        lines = [line for line in job.read_text().splitlines() if line.strip()]
        assert len(lines) <= 4 and lines[0].startswith("from csmn."), job.name


# What a GPU benchmark imports and runs on a lent GPU box, which has torch and torchvision
# but neither Ray nor MLflow nor pyarrow nor pandas (bench/model.py, bench/features.py
# --plain-only): those four are absent there, as a finder that knows them but cannot load
# them makes them here (torch probes optional packages with find_spec at import).
GPU_BOX_MODULES = ["csmn.core.model", "csmn.core.decoding", "csmn.core.image_features",
                   "bench.model", "bench.features", "bench.timing"]


def test_the_gpu_benchmarks_need_neither_ray_nor_mlflow_nor_pyarrow(tmp_path):
    from PIL import Image

    image = tmp_path / "a.jpg"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(image)
    script = f"""
import importlib, importlib.abc, importlib.machinery, sys
sys.path.insert(0, {str(REPO)!r})
ABSENT = ("ray", "mlflow", "pyarrow", "pandas")
class Absent(importlib.abc.Loader):
    def create_module(self, spec): return None
    def exec_module(self, module): raise ImportError(module.__name__ + ": not on a GPU box")
class Finder:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            return importlib.machinery.ModuleSpec(name, Absent())
sys.meta_path.insert(0, Finder())
for name in {GPU_BOX_MODULES!r}:
    importlib.import_module(name)
import torch
from csmn.core.decoding import greedy_decode
from csmn.core.image_decode import PreprocessConfig, load_image
from csmn.core.model import CSMN, ModelConfig
pixels = load_image({str(image)!r}, PreprocessConfig(resize_size=32, crop_size=32))
model = CSMN(ModelConfig(vocab_size=30, embed_dim=8, memory_dim=16, cnn_depth=4,
                         context_size=5, max_length=6)).eval()
out = greedy_decode(model, torch.rand(2, 2048), torch.randint(4, 30, (2, 5)))
assert pixels.shape == (32, 32, 3) and len(out.token_ids) == 2
loaded = [m for m in sys.modules if m.split(".")[0] in ABSENT and sys.modules[m] is not None]
print("ok", loaded)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stderr[-3000:]
