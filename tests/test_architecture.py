"""The seams of docs/architecture.md: imports go downwards only, and a new mixer or a new task is
one module that registers itself."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kernels", "model", "data", "train", "eval", "launch")
# what each package may import of ours (docs/architecture.md, "Layers")
ALLOWED = {
    "kernels": set(),
    "model": {"kernels"},
    "data": set(),
    "train": {"kernels", "model", "data"},
    "eval": {"kernels", "model", "data", "train"},
    "launch": {"kernels", "model", "data", "train", "eval"},
}


def _imports(path: Path, package: str) -> list[tuple[str, list[str], int]]:
    """(imported bla package, names taken from it, line) for every import of ``path``."""
    out = []
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name.split(".")[1], [], node.lineno) for a in node.names if a.name.startswith("bla.")]
        elif isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level:  # relative: inside its own package
                continue
            if node.module == "bla":
                out += [(n, [], node.lineno) for n in names]
            elif node.module and node.module.startswith("bla."):
                out.append((node.module.split(".")[1], names, node.lineno))
    return out


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return "bla." + ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _own_imports(path: Path) -> set[str]:
    """The modules of ``path``'s own package it imports (top level or inside functions), except
    under ``if TYPE_CHECKING:`` (annotations only) and the package's ``__init__`` re-exports."""
    module, package = _module_name(path), _module_name(path).split(".")[1]
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()

    def visit(node):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from . import x` imports the module x; `from .m import y` the module m
                candidate = f"{target}.{alias.name}"
                found.add(candidate if (ROOT / Path(*candidate.split(".")[1:])).with_suffix(".py").exists() else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m.startswith(f"bla.{package}.") and m != module}


def test_no_import_circle_inside_a_package():
    """A registry that imports its members which import it back, or two modules that need each
    other, make import order matter: helpers go to a leaf module, registries are filled by their
    members and listed in one place that imports both."""
    graph = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name != "__init__.py":
                graph[_module_name(path)] = _own_imports(path)
    circles = set()

    def walk(module, trail):
        for target in graph.get(module, ()):
            if target in trail:
                circles.add(" -> ".join(trail[trail.index(target) :] + [target]))
            elif target in graph:
                walk(target, trail + [target])

    for module in graph:
        walk(module, [module])
    assert not circles, "\n".join(sorted(circles))


def test_imports_only_go_downwards():
    wrong = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for target, names, line in _imports(path, package):
                where = f"{path.relative_to(ROOT)}:{line}"
                if target != package and target not in ALLOWED[package]:
                    wrong.append(f"{where} imports bla.{target} ({package} may import {sorted(ALLOWED[package]) or 'nothing'})")
                private = [n for n in names if n.startswith("_") and target != package]
                if private:
                    wrong.append(f"{where} imports private {private} from bla.{target}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("other_installed", [True, False])
def test_a_plain_import_kernels_from_the_repository_root_is_not_bla(tmp_path, other_installed):
    """Started in the repository root, `import kernels` finds the kernels folder first; it hands the
    name to an installed `kernels` package (Hugging Face's, which transformers >= 5.25 imports) or
    says why it cannot, and `bla.kernels` still works beside it."""
    from bla.launch.layout import fresh_process_env

    env = fresh_process_env()
    env.pop("PYTHONPATH", None)
    if other_installed:  # a stand-in for Hugging Face's package, after the root on sys.path
        (tmp_path / "kernels").mkdir()
        (tmp_path / "kernels" / "__init__.py").write_text("CUDAProperties = 'the other one'\n")
        env["PYTHONPATH"] = str(tmp_path)
    # Without it, the only `kernels` left on sys.path is the folder itself (the root, as '').
    trim = "" if other_installed else "sys.path[:] = ['']\n"
    code = ("import importlib.machinery, importlib.util, sys\nimport bla.kernels\n" + trim +
            "try:\n    import kernels\nexcept ImportError as e:\n    print('refused:', e)\n"
            "else:\n    print('got:', kernels.CUDAProperties)\n"
            "print(bla.kernels.bla_attention.__module__)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    first, module = done.stdout.strip().splitlines()
    assert module == "bla.kernels.api"
    if other_installed:
        assert first == "got: the other one"
    else:
        assert first.startswith("refused:") and "bla.kernels" in first


def test_eval_and_data_do_not_reach_into_the_trainer():
    for package in ("eval", "data", "model", "kernels"):
        for path in (ROOT / package).rglob("*.py"):
            assert "bla.train.trainer" not in path.read_text(), path


# ---------------------------------------------------------------- a mixer kind in one module


class CumulativeMean(nn.Module):
    """A toy mixer: each token mixes the mean of its document's values so far (causal, linear)."""

    exchange = None

    def __init__(self, cfg):
        super().__init__()
        self.v = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.o = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def new_cache(self, max_context=None):
        return None

    def forward(self, x, positions, cu_seqlens=None, cache=None, rope=None):
        v = self.v(x)
        total = v.cumsum(1)
        starts = (positions == 0).long().cumsum(1)  # document index of every token
        before = torch.zeros_like(total)
        for b in range(x.shape[0]):  # subtract what earlier documents of the row summed to
            for t in range(1, x.shape[1]):
                before[b, t] = before[b, t - 1] if starts[b, t] == starts[b, t - 1] else total[b, t - 1]
        return self.o((total - before) / (positions[..., None] + 1)), None


def test_a_new_mixer_is_one_module_that_registers_itself():
    from bla.model import BLALM, apply_overrides, load_preset, param_count, state_size
    from bla.model.registry import MIXERS, MixerKind, register
    from bla.train import sequence_parallel as sp

    register(MixerKind("mean", CumulativeMean, params=lambda cfg: 2 * cfg.d_model**2,
                       flops_per_token=lambda cfg, T: 4 * cfg.d_model, state_elements=lambda cfg, T: cfg.d_model))  # fmt: skip
    try:
        cfg = apply_overrides(load_preset("tiny"), ["layer_pattern=[bla, mean]", "n_layers=2"])
        torch.manual_seed(0)
        model = BLALM(cfg)
        assert param_count(cfg) == sum(p.numel() for p in model.parameters())
        assert state_size(cfg, 128)["elements"] == state_size(apply_overrides(cfg, ["layer_pattern=[bla]", "n_layers=1"]), 128)["elements"] + cfg.d_model
        ids = torch.randint(3, 200, (2, 16))
        out = model(ids[:, :-1], targets=ids[:, 1:])
        out.loss.backward()
        assert model.blocks[1].mixer.v.weight.grad is not None
        with pytest.raises(ValueError, match=r"sequence parallelism supports .* not \['mean'\]"):
            sp.enable(model, sp.SPContext(None, 0, 2))
        with pytest.raises(ValueError, match="registered already"):
            register(MixerKind("mean", CumulativeMean, params=lambda cfg: 0, flops_per_token=lambda cfg, T: 0,
                               state_elements=lambda cfg, T: 0))  # fmt: skip
    finally:
        del MIXERS["mean"]
    with pytest.raises(ValueError, match="unknown mixer 'mean' in layer_pattern"):
        apply_overrides(load_preset("tiny"), ["layer_pattern=[bla, mean]"])


# ---------------------------------------------------------------- a task in one module

COPY_TASK = '''
import itertools, sys, torch
from bla.data.synthetic import TaskLoader
from bla.data.task import loss_metrics, loss_sums, register_task

class CopyTask:
    """Repeat the first half of a row in its second half: labels only on the second half."""
    name, needs_text, validation_seed = "copy", False, 99

    def check(self, data, model_vocab):
        return [] if data.seq_len % 2 == 0 else [f"copy needs an even data.seq_len, got {data.seq_len}"]

    def _batches(self, data, micro_batch, seed, rank, world):
        def make(n, s):
            half = torch.randint(3, 60, (n, data.seq_len // 2), generator=torch.Generator().manual_seed(s))
            x = torch.cat([half, half], 1)
            labels = torch.full_like(x, -100)
            labels[:, data.seq_len // 2 - 1 : -1] = half
            return x, labels
        return TaskLoader(make, micro_batch, seed, rank, world)

    def train_loader(self, data, micro_batch, rank, world, tokenizer=None, shards=None):
        return self._batches(data, micro_batch, data.seed, rank, world)

    def eval_sums(self, score, data, micro_batch, batches, rank, world, tokenizer=None):
        held_out = self._batches(data, micro_batch, data.seed + self.validation_seed, rank, world)
        return loss_sums(score, itertools.islice(held_out, batches), accuracy=True)

    def eval_metrics(self, sums):
        return {**loss_metrics(sums), "val_accuracy": sums["correct"] / max(sums["examples"], 1.0)}

register_task(CopyTask())
from bla.train.config import load_train_config
from bla.train.trainer import run
print("SUMMARY", run(load_train_config("tiny", sys.argv[1:]))["val_accuracy"])
'''


@pytest.mark.slow
def test_a_new_task_is_one_module_that_registers_itself(tmp_path):
    from bla.launch.layout import fresh_process_env

    args = ["data.task=copy", "data.seq_len=32", "model.vocab_size=64", f"out_dir={tmp_path / 'run'}",
            f"cache_dir={tmp_path / 'cache'}", "steps=4", "eval_every=4", "save_every=4", "progress=false"]  # fmt: skip
    done = subprocess.run([sys.executable, "-c", COPY_TASK, *args], capture_output=True, text=True,
                          env=fresh_process_env(OMP_NUM_THREADS="1"), timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    accuracy = float(done.stdout.split("SUMMARY")[-1])
    assert 0.0 <= accuracy <= 1.0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["step"] == 4 and summary["tokenizer"] is None  # no text task: no tokenizer built
    bad = subprocess.run([sys.executable, "-c", COPY_TASK, *args, "data.seq_len=33"], capture_output=True, text=True,
                         env=fresh_process_env(OMP_NUM_THREADS="1"), timeout=300)  # fmt: skip
    assert bad.returncode != 0 and "copy needs an even data.seq_len, got 33" in bad.stderr


def test_the_package_ships_what_users_run_and_docs_list_it():
    """Benchmarks and one-off experiments live outside the package; every sweep it ships is in
    docs/sweeps.md and every experiment spec in experiments/README.md."""
    for package in PACKAGES:
        harnesses = [p.name for p in (ROOT / package).glob("*.py") if "benchmark" in p.name or p.name == "baseline.py"]
        assert not harnesses, f"{package}/ holds development harnesses {harnesses}: they belong in benchmarks/"
    shipped = sorted(p.stem for p in (ROOT / "launch" / "sweeps").glob("*.yaml"))
    usage = (ROOT / "docs" / "sweeps.md").read_text()
    assert shipped and all(f"`{name}`" in usage for name in shipped), shipped
    index = (ROOT / "experiments" / "README.md").read_text()
    unlisted = [p.stem for p in (ROOT / "experiments" / "sweeps").glob("*.yaml") if f"`{p.stem}`" not in index]
    assert not unlisted, f"experiments/README.md does not list {unlisted}"


def test_the_kernels_are_split_by_stage_and_tuned_in_one_place():
    """No kernels module over ~600 lines (the Triton op is one file a stage), and no environment
    knob read outside the tuning table (``BLA_TRITON_TUNE``, read by kernels/triton_tuning.py only)."""
    too_long = {p.name: n for p in (ROOT / "kernels").glob("*.py") if (n := len(p.read_text().splitlines())) > 600}
    assert not too_long, too_long
    knobs = {str(p.relative_to(ROOT)) for package in PACKAGES for p in (ROOT / package).rglob("*.py")
             if "BLA_TRITON_" in p.read_text() and p.name != "triton_tuning.py"}  # fmt: skip
    assert not knobs, f"BLA_TRITON_ read outside the tuning table: {sorted(knobs)}"
