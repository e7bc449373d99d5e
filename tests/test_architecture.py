"""The shape of the package: imports point one way, no package cycles, configs stay in the
builders, every public function is typed, and the worked example of docs/EXTENDING.md
(a second backbone) builds and trains through the normal config path."""

import ast
import inspect
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(REPO, "maedet")

# tools -> benchmark -> builders -> engine / evaluation / inference -> models / data / checkpoint -> config -> utils
LAYERS = {
    "utils": 0,
    "config": 1,
    "structures": 1,
    "kernels": 1,
    "models": 2,
    "data": 2,
    "checkpoint": 2,
    "engine": 3,
    "evaluation": 3,
    "inference": 3,
    "builders": 4,
    "benchmark": 5,
}


def _modules():
    for dirpath, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                yield rel.removesuffix(".__init__"), path


def _imports(module: str, path: str):
    """Every maedet module imported anywhere in the file (top level or inside functions)."""
    tree = ast.parse(open(path).read())
    pkg = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("maedet"):
                    yield a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("maedet"):
                yield name


def _layer(module: str):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_imports_point_down_and_packages_have_no_cycles():
    edges = {}
    upward = []
    for module, path in _modules():
        src = _layer(module)
        for target in _imports(module, path):
            dst = _layer(target)
            if src is None or dst is None or src == dst:
                continue
            edges.setdefault(src, set()).add(dst)
            if LAYERS[dst] > LAYERS[src]:
                upward.append(f"{module} imports {target} ({src} -> {dst})")
    assert not upward, "\n".join(upward)
    # no cycle between packages (same-layer packages may import each other only one way)
    state = {}

    def visit(n, stack):
        state[n] = "open"
        for m in edges.get(n, ()):
            if state.get(m) == "open":
                pytest.fail("package cycle: " + " -> ".join(stack + [n, m]))
            if m not in state:
                visit(m, stack + [n])
        state[n] = "done"

    for n in list(edges):
        if n not in state:
            visit(n, [])


def test_models_data_and_evaluation_never_read_a_config():
    """Layers below the builders take arguments, not config objects (the files themselves are
    read, so the check runs in any copy of the project, git checkout or not)."""
    parts = ("models", "data", "evaluation", "kernels", "structures")
    files = [p for m, p in _modules() if m.split(".")[1:2] and m.split(".")[1] in parts]
    assert len(files) > 20, files  # the walk found the package
    hits = [f"{p}:{i}" for p in files for i, line in enumerate(open(p), 1) if re.search(r"\bcfg\.", line)]
    assert not hits, hits


def test_tools_use_only_public_names_of_the_library():
    """tools/ are thin: every ``from maedet... import name`` names a module that exists and a
    public name (no ``_private`` helper reached into), imports resolved statically."""
    import importlib.util

    tools = sorted(f for f in os.listdir(os.path.join(REPO, "tools")) if f.endswith(".py"))
    assert {"train_net.py", "pretrain.py", "infer.py", "benchmark.py"} <= set(tools)
    bad = []
    for f in tools:
        tree = ast.parse(open(os.path.join(REPO, "tools", f)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("maedet"):
                mod = importlib.import_module(node.module)
                for a in node.names:
                    exists = hasattr(mod, a.name) or importlib.util.find_spec(f"{node.module}.{a.name}") is not None
                    if a.name.startswith("_") or not exists:
                        bad.append(f"tools/{f}: from {node.module} import {a.name}")
    assert not bad, bad


def test_no_module_over_500_lines():
    long = [f"{m}: {n}" for m, p in _modules() if (n := sum(1 for _ in open(p))) > 520]
    assert not long, long


def test_public_functions_have_type_hints():
    import importlib

    missing = []
    for module, _ in _modules():
        mod = importlib.import_module(module)
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name)
            funcs = [(name, obj)] if inspect.isfunction(obj) else []
            if inspect.isclass(obj) and obj.__module__ == mod.__name__:
                funcs += [
                    (f"{name}.{n}", f)
                    for n, f in vars(obj).items()
                    if inspect.isfunction(f) and not n.startswith("_") or n == "__init__" and inspect.isfunction(f)
                ]
            for qual, f in funcs:
                sig = inspect.signature(f)
                params = [
                    p
                    for p in sig.parameters.values()
                    if p.name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                ]
                if any(p.annotation is inspect.Parameter.empty for p in params):
                    missing.append(f"{module}.{qual}")
    assert not missing, missing


def test_tools_import_without_path_edits():
    for tool in ("train_net", "pretrain", "infer", "convert_checkpoint", "benchmark"):
        src = open(os.path.join(REPO, "tools", f"{tool}.py")).read()
        assert "sys.path" not in src, tool
        r = subprocess.run(
            [sys.executable, os.path.join(REPO, "tools", f"{tool}.py"), "--help"],
            cwd="/",
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr[-2000:]


EXTENDING_CONFIG = """
_base_: {repo}/configs/quickstart/mask_rcnn_vit_tiny.yaml
output_dir: {out}
model:
  backbone:
    _replace_: true   # a different backbone: do not inherit the ViT's keys
    name: resnet
    variant: resnet18
  neck: {{out_channels: 32, square_pad: 64}}
  roi_heads: {{box_head_conv_dims: [32], box_head_fc_dims: [64], mask_head_conv_dims: [32],
              batch_size_per_image: 32}}
data:
  train: {{name: "", json: {toy}/annotations/instances_train.json, images: {toy}/train,
          pipeline: {{image_size: 64}}}}
  test: {{name: "", json: {toy}/annotations/instances_val.json, images: {toy}/val,
         pipeline: {{short_edge_length: 64, max_size: 64}}}}
solver: {{max_iter: 4, warmup_iters: 1, steps: [3]}}
train: {{batch_size: 2, num_workers: 0, checkpoint_period: 0, log_period: 1, persistent_workers: false}}
test: {{eval_period: 0}}
"""


def test_extending_example_backbone_trains_through_the_config_path(tmp_path):
    """docs/EXTENDING.md: the ResNet backbone (one file + its registration) selected by
    model.backbone.name, trained a few iterations and evaluated by tools/train_net.py."""
    import json

    import torch

    from maedet.data.toy import generate_toy_dataset

    toy = str(tmp_path / "toy")
    generate_toy_dataset(toy, num_train=4, num_val=2, image_size=64, seed=0)
    cfg = tmp_path / "resnet.yaml"
    cfg.write_text(EXTENDING_CONFIG.format(repo=REPO, out=tmp_path / "out", toy=toy))
    r = subprocess.run(
        [sys.executable, "tools/train_net.py", "--config", str(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="2"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    resolved = open(tmp_path / "out" / "config.yaml").read()
    assert "name: resnet" in resolved and "embed_dim" not in resolved
    state = torch.load(tmp_path / "out" / "model_final.pth", weights_only=True)
    assert "backbone.net.layer3.1.conv2.weight" in state["model"]
    lines = [json.loads(x) for x in open(tmp_path / "out" / "metrics.jsonl")]
    assert [x["iter"] for x in lines if "loss" in x] == [0, 1, 2, 3]
    assert "segm/AP" in lines[-1]
