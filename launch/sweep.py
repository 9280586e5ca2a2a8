"""``bla sweep``: grids of training runs over state size, their results table, plots and the
state-efficiency ratio.

A sweep spec (YAML; named ones live in ``launch/sweeps/``):

    name: mqar_budget
    preset: mqar                     # the train preset every run starts from
    overrides: [steps=2000]          # for every run (train config keys, dotted)
    pinned: [model.bla.gates=dirichlet]  # defaults of the time the sweep ran, restated (not in run names)
    mixers:                          # per mixer: a grid (key -> values) or a list of override dicts
      bla: {model.layer_pattern: [[bla]], model.bla.slots: [4, 8, 16], model.bla.window: [256]}
      swa: {model.layer_pattern: [[swa]], model.swa_window: [16, 32, 64]}
    grid: {optim.lr: [1.0e-3, 3.0e-3], seed: [0]}   # crossed with every mixer's runs
    metric: accuracy                 # accuracy (mqar, regbench) or loss (lm; lower is better)
    eval: {examples: 1000}           # mqar: held-out examples per run; lm: {docs: 64} validation documents
    targets: [0.5, 0.9]              # state efficiency: state needed to reach these
    baseline: swa                    # ... relative to this mixer

Runs go one after another, or ``--jobs J`` at a time (each job on its own GPUs when there are
enough, otherwise sharing them: small models leave a GPU mostly idle), each on one device or
over ``--nproc N`` processes through torchrun. A run is named by its mixer and a hash of its
overrides, writes its config, metrics and state size to ``<sweep>/runs/<name>/result.json`` and
is skipped once that file exists, so an interrupted sweep resumes where it stopped (a run cut
mid-way resumes from its last checkpoint). The report (``results.csv``, ``results.json``,
``state_efficiency.json`` and ``<metric>_vs_state.png``) is rebuilt from whatever results exist.

The learning rate of each configuration is chosen on the validation split (the trainer's last
``val_accuracy``, or ``val_loss``: MQAR examples of another seed stream than the test's, RegBench
automata of another pool), never on the test examples the report then shows (``selected_on`` says which it was; results written
before validation was recorded fall back to the test metric and say so).
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from bla.model.stats import param_count, state_size

from .laws import law_value, loss_laws
from .layout import fresh_process_env

METRICS = {"accuracy": True, "loss": False}  # name -> higher is better
SELECT = {"accuracy": "val_accuracy", "loss": "loss"}  # the validation metric that picks the learning rate


@dataclass
class SweepSpec:
    name: str
    preset: str
    mixers: dict[str, list[dict]]  # mixer -> the override dicts of its runs (grids expanded)
    overrides: list[str] = field(default_factory=list)
    grid: dict[str, list] = field(default_factory=dict)
    metric: str = "accuracy"
    eval: dict = field(default_factory=dict)
    targets: list[float] = field(default_factory=list)
    baseline: str = "swa"
    # Overrides that restate a default as it was when the sweep ran, so that a later change of the
    # default does not change what the sweep trains; left out of run names, so finished runs keep theirs.
    pinned: list[str] = field(default_factory=list)

    def runs(self) -> list[tuple[str, dict]]:
        """(mixer, overrides) of every run: each mixer's runs crossed with the shared grid."""
        shared = expand(self.grid)
        return [(mixer, {**own, **common}) for mixer, runs in self.mixers.items() for own in runs for common in shared]


def expand(grid: dict[str, list] | list[dict]) -> list[dict]:
    if isinstance(grid, list):
        return [dict(d) for d in grid]
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"sweep grid: {key!r} needs a non-empty list of values, got {values!r}")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def named_sweeps() -> list[str]:
    """The names of the sweeps shipped in ``launch/sweeps/``."""
    return sorted(p.name[:-5] for p in resources.files("bla.launch").joinpath("sweeps").iterdir() if p.name.endswith(".yaml"))


def load_spec(name_or_path: str) -> SweepSpec:
    """A named sweep (``launch/sweeps/<name>.yaml``) or a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ValueError(f"sweep spec {path} does not exist")
        data = yaml.safe_load(path.read_text())
    else:
        named = resources.files("bla.launch").joinpath("sweeps", f"{name_or_path}.yaml")
        if not named.is_file():
            raise ValueError(f"unknown sweep {name_or_path!r}; named sweeps: {', '.join(named_sweeps())}")
        data = yaml.safe_load(named.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"sweep spec {name_or_path}: expected a mapping")
    unknown = set(data) - {"name", "preset", "overrides", "pinned", "mixers", "grid", "metric", "eval", "targets", "baseline"}
    if unknown:
        raise ValueError(f"sweep spec {name_or_path}: unknown keys {sorted(unknown)}")
    for key in ("name", "preset", "mixers"):
        if key not in data:
            raise ValueError(f"sweep spec {name_or_path}: missing {key!r}")
    if data.get("targets") and data.get("baseline", "swa") not in data["mixers"]:
        raise ValueError(f"sweep spec {name_or_path}: baseline {data.get('baseline', 'swa')!r} is not one of its mixers")
    pinned = data.get("pinned", [])
    if not isinstance(pinned, list) or not all(isinstance(o, str) and "=" in o for o in pinned):
        raise ValueError(f"sweep spec {name_or_path}: pinned must be a list of key=value overrides, got {pinned!r}")
    if data.get("metric", "accuracy") not in METRICS:
        raise ValueError(f"sweep spec {name_or_path}: metric must be one of {sorted(METRICS)}")
    data["mixers"] = {m: expand(g) for m, g in data["mixers"].items()}
    spec = SweepSpec(**data)
    for mixer, overrides in spec.runs():
        train_config(spec, overrides)  # every run's config is valid before anything trains
    return spec


def run_args(spec: SweepSpec, overrides: dict, pinned: bool = True) -> list[str]:
    """The train-config overrides of one run: the sweep's pinned defaults, its overrides, then the
    run's own."""

    def text(v):
        return json.dumps(v) if isinstance(v, (list, dict, bool)) else str(v)

    return [*(spec.pinned if pinned else []), *spec.overrides, *(f"{k}={text(v)}" for k, v in overrides.items())]


def train_config(spec: SweepSpec, overrides: dict):
    from bla.train.config import load_train_config

    return load_train_config(spec.preset, run_args(spec, overrides))


def run_name(spec: SweepSpec, mixer: str, overrides: dict) -> str:
    """The mixer and a hash of everything that sets the run up: editing the sweep's shared
    overrides makes new runs, while adding grid points (or pinning a default) keeps the finished ones."""
    digest = hashlib.sha1(json.dumps([spec.preset, run_args(spec, overrides, pinned=False)]).encode()).hexdigest()[:8]
    return f"{mixer}-{digest}"


def _train(spec: SweepSpec, overrides: dict, out: Path, cache_dir: str, nproc: int, log_file: Path, env: dict) -> None:
    args = [spec.preset, *run_args(spec, overrides), f"out_dir={out}", f"cache_dir={cache_dir}", "progress=false"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "bla.train.cli", *args]
    else:
        cmd = [sys.executable, "-m", "bla.train.cli", *args]
    with open(log_file, "a") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        tail = log_file.read_text()[-2000:]
        raise RunFailed(out.name, log_file, f"training run {out.name} failed (exit {done.returncode}); log {log_file}:\n{tail}")


class SweepFailed(RuntimeError):
    """Some runs failed; the others were trained and reported."""


class RunFailed(RuntimeError):
    """A run's training process failed (not a divergence, which is a result): the sweep trains the
    other runs, writes their report, then fails naming this one and its log."""

    def __init__(self, run: str, log_file: Path, message: str):
        super().__init__(message)
        self.run, self.log_file = run, log_file


def evaluate_run(spec: SweepSpec, run_dir: Path, device) -> dict:
    """The sweep's metrics of one finished run: ``loss`` (the trainer's last validation loss), and
    the task's held-out test scores (``accuracy``, plus ``tvd`` for RegBench), with the sweep's
    ``eval`` options (examples, batch, seed: the task's test seed unless given); for language
    modelling, ``bits_per_byte`` and ``loss_by_position`` over the first ``docs`` validation documents."""
    from bla.data import task_named
    from bla.train.checkpoint import load_run

    model, tok, cfg = load_run(run_dir, device)
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = {"loss": summary.get("val_loss"), "val_accuracy": summary.get("val_accuracy")}  # validation split
    task = task_named(cfg.data.task)
    if not task.needs_text:
        metrics.update(task.test_scores(model, cfg.data, device, **spec.eval))
    else:  # language modelling: bits per byte and the loss by position in the document, on validation documents
        from bla.data import DataSourceConfig, parse_source
        from bla.eval.perplexity import perplexity

        source = DataSourceConfig([parse_source(s) for s in cfg.data.val_sources])
        scored = perplexity(model, tok, source, cfg.data.seq_len, spec.eval.get("docs", LM_EVAL_DOCS), device)
        metrics.update(bits_per_byte=scored["bits_per_byte"], loss_by_position=scored["loss_by_position"])
    return metrics


def _one_run(spec: SweepSpec, out: Path, mixer: str, overrides: dict, nproc: int, cache_dir: str, slot_gpus: list[int] | None) -> str:
    """Train and evaluate one run, on ``slot_gpus`` when the sweep gives each job its own GPUs."""
    import torch

    run_dir = out / "runs" / run_name(spec, mixer, overrides)
    run_dir.mkdir(exist_ok=True)
    cfg = train_config(spec, overrides)
    (run_dir / "sweep_run.json").write_text(json.dumps({"mixer": mixer, "overrides": overrides}, indent=1))
    env = fresh_process_env()
    if slot_gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = child_visible_devices(slot_gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    start = time.time()
    try:
        _train(spec, overrides, run_dir, cache_dir, nproc, run_dir / "train.log", env)
        diverged = None
    except RunFailed:
        diverged = _diverged(run_dir)
        if diverged is None:  # a failure, not a result: left to run_sweep
            raise
    seconds = time.time() - start
    device = torch.device("cuda", slot_gpus[0]) if slot_gpus else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.time()
    # a diverged run is a result of the learning-rate sweep (that rate failed), not an error: it
    # has no metrics, so it never wins the selection, and the report lists it
    metrics = evaluate_run(spec, run_dir, device) if diverged is None else {spec.metric: None, "diverged": diverged}
    state = state_size(cfg.model, cfg.data.seq_len)
    result = {"run": run_dir.name, "mixer": mixer, "overrides": overrides, "train_seconds": seconds,
              "eval_seconds": time.time() - start, "state_elements": state["elements"], "state_bytes": state["bytes"],
              "params": param_count(cfg.model), "config": cfg.to_dict(), **metrics}  # fmt: skip
    tmp = run_dir / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, run_dir / "result.json")  # last: its presence marks the run done
    shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)} if diverged is None else f"diverged: {diverged}"
    return f"[bla sweep] {run_dir.name} {overrides} state={state['elements']:,} {shown} ({seconds:.0f} s)"


def _diverged(run_dir: Path) -> str | None:
    """The trainer's status when it stopped the run on non-finite losses (its summary says so), else None."""
    try:
        status = json.loads((run_dir / "summary.json").read_text()).get("status", "")
    except (OSError, ValueError):
        return None
    return status if status.startswith("stopped on") and "non-finite" in status else None


def job_gpus(jobs: int, nproc: int, gpus: int) -> list[list[int] | None]:
    """Each concurrent job's GPUs: its own ``nproc`` of them when there are enough for all jobs,
    otherwise ``None`` (the jobs share every device; right for small models that leave a GPU idle)."""
    if gpus >= jobs * nproc > nproc:
        return [list(range(j * nproc, (j + 1) * nproc)) for j in range(jobs)]
    return [None] * jobs


def child_visible_devices(gpus: list[int], parent_visible: str | None) -> str:
    """CUDA_VISIBLE_DEVICES of a job given ``gpus`` in the sweep's numbering, which is relative to
    the sweep's own CUDA_VISIBLE_DEVICES when that is set."""
    ids = parent_visible.split(",") if parent_visible else None
    return ",".join(ids[g].strip() if ids else str(g) for g in gpus)


def run_sweep(spec: SweepSpec, out: str | Path, nproc: int = 1, jobs: int = 1, cache_dir: str = "~/.cache/bla",
              progress: bool = True, start_by: float | None = None) -> dict:  # fmt: skip
    """Train and evaluate every run not done yet, ``jobs`` at a time, then write the report.
    ``start_by`` (seconds): no run starts later than that after the sweep began; runs already
    started finish (a time-limited machine then returns only whole runs, and the next call resumes)."""
    import queue
    from concurrent.futures import ThreadPoolExecutor, as_completed

    import torch
    from tqdm import tqdm

    if jobs < 1 or nproc < 1:
        raise ValueError(f"bla sweep: --jobs and --nproc must be >= 1, got jobs={jobs}, nproc={nproc}")
    if start_by is not None and start_by < 0:
        raise ValueError(f"bla sweep: --start-by must be >= 0 seconds, got {start_by}")
    began = time.monotonic()
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "spec.yaml").write_text(yaml.safe_dump(spec.__dict__, sort_keys=False))
    runs = spec.runs()
    todo = [(m, o) for m, o in runs if not (out / "runs" / run_name(spec, m, o) / "result.json").exists()]
    print(f"[bla sweep] {spec.name}: {len(runs)} runs, {len(runs) - len(todo)} already done, {jobs} at a time -> {out}", flush=True)
    slots: queue.Queue = queue.Queue()
    for gpus in job_gpus(jobs, nproc, torch.cuda.device_count()):
        slots.put(gpus)

    def in_a_slot(mixer: str, overrides: dict) -> str | None:
        gpus = slots.get()
        if start_by is not None and time.monotonic() - began > start_by:
            slots.put(gpus)
            return None  # past --start-by: left for the next call
        try:
            return _one_run(spec, out, mixer, overrides, nproc, cache_dir, gpus)
        finally:
            slots.put(gpus)

    failed: list[RunFailed] = []
    with ThreadPoolExecutor(max_workers=jobs) as pool, tqdm(total=len(todo), desc=spec.name, disable=not progress) as bar:
        futures = [pool.submit(in_a_slot, m, o) for m, o in todo]
        left = 0
        try:
            for done in as_completed(futures):
                try:
                    line = done.result()
                except RunFailed as exc:  # one configuration failing (a device fault, a bug) costs only its run
                    failed.append(exc)
                    line = f"[bla sweep] {exc}"
                if line is None:
                    left += 1
                else:
                    print(line, flush=True)
                bar.update()
        except BaseException:  # anything else (an interrupt) stops the sweep: running runs finish, queued ones never start
            pool.shutdown(cancel_futures=True)
            raise
    if left:
        print(f"[bla sweep] {left} runs not started: past --start-by {start_by:g} s; run the sweep again to train them", flush=True)
    summary = report(spec, out)
    if failed:
        names = "; ".join(f"{exc.run} (log {exc.log_file})" for exc in failed)
        raise SweepFailed(f"{spec.name}: {len(failed)} of {len(todo)} runs failed: {names}. The report has the others; "
                          "running the sweep again trains the failed runs again")  # fmt: skip
    return summary


def restore_runs(spec: SweepSpec, out: str | Path, sources: list[str | Path] = ()) -> int:
    """Rebuild ``runs/<name>/result.json`` of this spec's runs from the sweep's ``results.csv``
    (and those of the sweep directories ``sources``: run names are shared by sweeps whose runs are
    set up alike) where it is missing; returns how many. runs/ stays out of git (checkpoints,
    logs) while the report is committed, so a fresh clone, or a bare GPU machine handed the
    report, resumes the sweep without retraining what it lists. A restored result has the
    report's columns (metrics, state, parameters, overrides) and ``restored_from``; not its
    config or training curve."""
    out = Path(out)
    missing = [str(s) for s in sources if not (Path(s) / "results.csv").exists()]
    if missing:
        raise FileNotFoundError(f"bla sweep --restore: no results.csv in {missing} (expected sweep directories with a report)")
    rows = {}
    for table in [Path(s) / "results.csv" for s in sources] + [out / "results.csv"]:  # the sweep's own last: it wins
        if table.exists():
            with open(table, newline="") as f:
                rows.update({row["run"]: (row, table) for row in csv.DictReader(f)})
    ints, floats = ("state_elements", "state_bytes", "params"), ("accuracy", "val_accuracy", "loss", "tvd", "train_seconds")
    restored = 0
    for mixer, overrides in spec.runs():
        name = run_name(spec, mixer, overrides)
        target = out / "runs" / name / "result.json"
        if name not in rows or target.exists():
            continue
        row, table = rows[name]
        listed = {k: json.loads(v) for k, v in row.items() if k not in ints + floats + ("run", "mixer", "diverged") and v not in ("", "null")}
        if row["mixer"] != mixer or listed != overrides:
            raise ValueError(f"bla sweep --restore: {table} lists run {name} as {row['mixer']} {listed}, but the spec "
                             f"names it {mixer} {overrides}; was the file edited?")  # fmt: skip
        result = {"run": name, "mixer": mixer, "overrides": overrides, "restored_from": str(table),
                  **{k: int(row[k]) for k in ints if row.get(k)},
                  **{k: (float(row[k]) if row.get(k) else None) for k in floats},
                  "diverged": row.get("diverged") or None}  # fmt: skip
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, target)
        restored += 1
    return restored


# ---- the report ----
def _results(spec: SweepSpec, out: Path) -> list[dict]:
    """Finished runs of this spec (runs of an edited spec's old grid stay out of the report)."""
    names = {run_name(spec, m, o) for m, o in spec.runs()}
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/result.json")) if p.parent.name in names]


AVERAGED = ("accuracy", "val_accuracy", "loss", "tvd", "bits_per_byte", "train_seconds")  # what a point reports as its mean over seeds
LM_EVAL_DOCS = 64  # validation documents an LM run's loss by position is measured on (``eval: {docs: N}``)


def _mean_by_position(runs: list[dict]) -> list[dict] | None:
    """The seeds' mean loss in each position bucket (the buckets every seed has)."""
    if not all(r.get("loss_by_position") for r in runs):
        return None
    tables = [{(b["from"], b["to"]): b for b in r["loss_by_position"]} for r in runs]
    shared = [key for key in tables[0] if all(key in t for t in tables)]
    return [{**tables[0][key], "loss": sum(t[key]["loss"] for t in tables) / len(tables)} for key in shared]


def best_over_lr(spec: SweepSpec, results: list[dict]) -> list[dict]:
    """Per configuration (everything but the learning rate and the seed): the learning rate whose
    mean over seeds of the validation metric (``SELECT``) is best; a rate at which any seed
    diverged is not a candidate. Each point carries the means,
    ``seeds`` (how many runs), the reported metric's range over them (``<metric>_min``,
    ``<metric>_max``) and ``selected_on``."""
    m, higher = spec.metric, METRICS[spec.metric]
    select = SELECT[m]
    groups: dict[str, dict[str, list[dict]]] = {}  # configuration -> learning rate -> runs (seeds)
    failed = set()  # (configuration, learning rate) where a seed diverged: that rate is not a candidate
    for r in results:
        config = {"mixer": r["mixer"], **{k: v for k, v in r["overrides"].items() if k not in ("optim.lr", "seed")}}
        key = json.dumps(config, sort_keys=True), json.dumps(r["overrides"].get("optim.lr"))
        if r.get("diverged"):
            failed.add(key)
        if r.get(m) is None or not math.isfinite(r[m]):
            continue
        groups.setdefault(key[0], {}).setdefault(key[1], []).append(r)
    points = []
    for config, by_lr in groups.items():
        candidates = []
        for lr, runs in by_lr.items():
            if (config, lr) in failed:
                continue
            point = {**runs[0], "run": ",".join(r["run"] for r in runs), "seeds": len(runs),
                     "overrides": {k: v for k, v in runs[0]["overrides"].items() if k != "seed"}}  # fmt: skip
            for key in AVERAGED:
                values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
                point[key] = sum(values) / len(values) if len(values) == len(runs) else None
            point["loss_by_position"] = _mean_by_position(runs)
            point[m + "_min"], point[m + "_max"] = min(r[m] for r in runs), max(r[m] for r in runs)
            validated = isinstance(point.get(select), (int, float)) and math.isfinite(point[select])
            point["selected_on"] = select if validated else f"{m} (test: no validation recorded)"
            candidates.append(point)
        if not candidates:
            continue
        key = select if all(c["selected_on"] == select for c in candidates) else m
        points.append(max(candidates, key=lambda p: p[key] if higher else -p[key]))
    return sorted(points, key=lambda r: (r["mixer"], r["state_elements"]))


def state_efficiency(spec: SweepSpec, points: list[dict]) -> dict:
    """For each target: the least state with which each mixer reaches it, and the baseline's
    state divided by that (how many times less state than the baseline the mixer needs)."""
    higher = METRICS[spec.metric]
    table = {}
    for target in spec.targets:
        need = {}
        for r in points:
            reached = r[spec.metric] >= target if higher else r[spec.metric] <= target
            if reached and (r["mixer"] not in need or r["state_elements"] < need[r["mixer"]]):
                need[r["mixer"]] = r["state_elements"]
        base = need.get(spec.baseline)
        table[str(target)] = {
            m: {"state_elements": need.get(m), "times_less_than_" + spec.baseline: (base / need[m] if base and m in need else None)}
            for m in sorted(spec.mixers)
        }  # fmt: skip
    return table


def report(spec: SweepSpec, out: str | Path) -> dict:
    out = Path(out)
    results = _results(spec, out)
    columns = ["run", "mixer", "state_elements", "state_bytes", "params", "accuracy", "val_accuracy", "loss", "tvd", "bits_per_byte",
               "train_seconds", "diverged"]
    keys = sorted({k for r in results for k in r["overrides"]})
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns + keys)
        for r in results:
            w.writerow([r.get(c) for c in columns] + [json.dumps(r["overrides"].get(k)) for k in keys])
    points = best_over_lr(spec, results)
    efficiency = state_efficiency(spec, points)
    laws = None if METRICS[spec.metric] else loss_laws(points, spec.metric)  # a law for losses (lower is better)
    spread = ["seeds", spec.metric + "_min", spec.metric + "_max", "selected_on"]
    summary = {"name": spec.name, "metric": spec.metric, "runs": len(results), "expected_runs": len(spec.runs()),
               "best_over_lr": [{k: r.get(k) for k in columns + spread + ["loss_by_position"]} | {"overrides": r["overrides"]}
                                for r in points],
               "state_efficiency": efficiency, **({"laws": laws} if laws else {}),
               "diverged": [{"run": r["run"], "overrides": r["overrides"], "status": r["diverged"]} for r in results if r.get("diverged")]}  # fmt: skip
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "state_efficiency.json").write_text(json.dumps(efficiency, indent=1))
    if laws:
        (out / "laws.json").write_text(json.dumps(laws, indent=1))
    if points:
        try:
            plot(spec, points, out / f"{spec.metric}_vs_state.png", laws)
            plot_curves(spec, points, out, out / "learning_curves.png")
            if any(p.get("loss_by_position") for p in points):
                plot_by_position(spec, points, out / "loss_by_position.png")
        except ImportError as exc:  # a bare GPU machine: `bla sweep --report` elsewhere draws it
            print(f"[bla sweep] no plot: {exc}")
    print(f"{'mixer':>9} {'state':>11} {spec.metric:>9} {'seeds':>5} {'range':>15}  overrides (optim.lr chosen on {SELECT[spec.metric]})")
    for r in points:
        shown = {k: v for k, v in r["overrides"].items() if k != "model.layer_pattern"}
        span = f"{r[spec.metric + '_min']:.4f}-{r[spec.metric + '_max']:.4f}"
        print(f"{r['mixer']:>9} {r['state_elements']:>11,} {r[spec.metric]:>9.4f} {r['seeds']:>5} {span:>15}  {shown}")
    for target, row in efficiency.items():
        cells = ", ".join(f"{m}: {v['state_elements'] or 'not reached'}" for m, v in row.items())
        print(f"state to reach {spec.metric} {target}: {cells}")
    for mixer, law in (laws or {}).get("laws", {}).items():
        print(f"law {mixer}: {spec.metric} = {law['a']:.4f} + {law['b']:.4g} * state^-{law['c']:.3f} "
              f"(rmse {law['rmse']:.4f}, largest residual {law['max_residual']:.4f}, {law['points']} points)")  # fmt: skip
        for m in laws["matches"][mixer]:
            ratio = m["times_less_state"]
            need = "never (below its asymptote)" if m["state"] is None else \
                f"{m['state']:,.0f} ({ratio:.2f}x less state)" if ratio >= 1 else f"{m['state']:,.0f} ({1 / ratio:.2f}x more state)"
            print(f"  {mixer} matches {m['peer']} at {m['peer_state']:,} ({m['peer_' + spec.metric]:.4f}): {need}"
                  + (" extrapolated" if m["extrapolated"] else ""))  # fmt: skip
    for r in summary["diverged"]:
        print(f"diverged (not selectable): {r['run']} {r['overrides']}")
    return summary


def plot(spec: SweepSpec, points: list[dict], path: Path, laws: dict | None = None) -> None:
    """The metric against state per mixer (best over learning rates, seeds' range), with each
    fitted law (``bla.launch.laws``) dashed over the states it was fitted on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    higher = METRICS[spec.metric]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for mixer in spec.mixers:
        mine = [r for r in points if r["mixer"] == mixer]
        if not mine:
            continue
        ax.scatter([r["state_elements"] for r in mine], [r[spec.metric] for r in mine], alpha=0.35, s=18)
        color = ax.collections[-1].get_facecolor()[0][:3]
        frontier: dict[int, dict] = {}  # best point per state size: the curve
        for r in mine:
            s, v = r["state_elements"], r[spec.metric]
            if s not in frontier or (v > frontier[s][spec.metric]) == higher:
                frontier[s] = r
        xs = sorted(frontier)
        ax.plot(xs, [frontier[x][spec.metric] for x in xs], marker="o", label=mixer, color=color)
        for x in xs:  # the range over seeds
            f = frontier[x]
            if f["seeds"] > 1:
                below, above = f[spec.metric] - f[spec.metric + "_min"], f[spec.metric + "_max"] - f[spec.metric]
                ax.errorbar([x], [f[spec.metric]], yerr=[[below], [above]], color=color, capsize=4, alpha=0.7)
        law = (laws or {}).get("laws", {}).get(mixer)
        if law:
            lo, hi = law["states"]
            grid = [lo * (hi / lo) ** (i / 63) for i in range(64)]
            ax.plot(grid, [law_value(law, x) for x in grid], linestyle="--", color=color, alpha=0.8, linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("state size (elements per sequence, all layers)")
    ax.set_ylabel(spec.metric + (" (best over learning rates)" if len(spec.grid.get("optim.lr", [])) > 1 else ""))
    seeds = max(p["seeds"] for p in points)
    ax.set_title(spec.name + (f": mean and range over {seeds} seeds" if seeds > 1 else ""))
    ax.margins(x=0.08)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def learning_curves(out: Path, point: dict) -> list[tuple[list[int], list[float]]]:
    """(steps, train losses) of each seed's run of a reported point, from its summary.json."""
    curves = []
    for run in point["run"].split(","):
        summary = out / "runs" / run / "summary.json"
        if summary.exists():
            losses = json.loads(summary.read_text()).get("losses", [])
            curves.append(([h["step"] for h in losses], [h["loss"] for h in losses]))
    return curves


def _panels(mixers: list[str]):
    """A figure with a panel per mixer (at most 4 a row), sharing the y axis: (plt, fig, axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(mixers))
    rows = -(-len(mixers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(4.2 * cols, 7.0), 3.2 * rows), squeeze=False, sharey=True)  # title fits
    for ax in axes.flat[len(mixers) :]:
        ax.axis("off")
    return plt, fig, axes


def _save_panels(plt, fig, axes, ylabel: str, title: str, path: Path) -> None:
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_by_position(spec: SweepSpec, points: list[dict], path: Path) -> None:
    """Validation loss against the position in the document (log scale), a panel per mixer and a
    colour per state size, each at its chosen learning rate: whether a mixer's state carries
    information past its window shows as loss that keeps falling beyond it."""
    mixers = [m for m in spec.mixers if any(p["mixer"] == m and p.get("loss_by_position") for p in points)]
    plt, fig, axes = _panels(mixers)
    for ax, mixer in zip(axes.flat, mixers):
        mine = sorted((p for p in points if p["mixer"] == mixer and p.get("loss_by_position")), key=lambda p: p["state_elements"])
        colours = plt.cm.viridis([i / max(1, len(mine) - 1) for i in range(len(mine))])
        for point, colour in zip(mine, colours):
            buckets = point["loss_by_position"]
            ax.plot([max(1, b["from"]) for b in buckets], [b["loss"] for b in buckets], marker="o", markersize=3, color=colour,
                    label=f"state {point['state_elements']:,}")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_title(mixer)
        ax.set_xlabel("position in the document (bucket start)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    _save_panels(plt, fig, axes, "validation loss", f"{spec.name}: loss by position at each point's chosen learning rate", path)


def plot_curves(spec: SweepSpec, points: list[dict], out: Path, path: Path) -> None:
    """The training loss of every reported point (each configuration at its chosen learning rate),
    a panel per mixer, a colour per state size, each seed a line (a running mean over 2% of the
    steps): whether the runs behind the report had converged."""
    curves = {p["run"]: learning_curves(out, p) for p in points}
    if not any(curves.values()):  # every run restored from a report (no summaries): keep the figure there is
        return
    mixers = [m for m in spec.mixers if any(p["mixer"] == m for p in points)]
    plt, fig, axes = _panels(mixers)
    for ax, mixer in zip(axes.flat, mixers):
        mine = sorted((p for p in points if p["mixer"] == mixer), key=lambda p: p["state_elements"])
        colours = plt.cm.viridis([i / max(1, len(mine) - 1) for i in range(len(mine))])
        for point, colour in zip(mine, colours):
            for i, (steps, losses) in enumerate(curves[point["run"]]):
                width = max(1, len(losses) // 50)
                smooth = [sum(losses[max(0, j - width + 1) : j + 1]) / len(losses[max(0, j - width + 1) : j + 1]) for j in range(len(losses))]
                label = f"state {point['state_elements']:,}, {spec.metric} {point[spec.metric]:.3f}" if i == 0 else None
                ax.plot(steps, smooth, color=colour, alpha=0.85, linewidth=1.2, label=label)
        ax.set_title(mixer)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper right")
    missing = sum(len(p["run"].split(",")) - len(curves[p["run"]]) for p in points)  # runs without a summary (restored)
    _save_panels(plt, fig, axes, "train loss", f"{spec.name}: training loss at each point's chosen learning rate"
                 + (f"\n({missing} runs restored from reports, without curves)" if missing else ""), path)  # fmt: skip


def add_sweep_command(sub) -> None:
    p = sub.add_parser("sweep", help="grids of runs over state size: results table, plots, state efficiency")
    p.add_argument("spec", help="a named sweep (launch/sweeps/) or a sweep YAML file")
    p.add_argument("--out", default="", help="sweep directory (default sweeps/<name>)")
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each gets its own GPUs when there are enough, "
                   "otherwise they share the devices: small models leave a GPU mostly idle)")
    p.add_argument("--cache-dir", default="~/.cache/bla")
    p.add_argument("--start-by", type=float, default=None, metavar="SECONDS",
                   help="start no run later than this after the sweep began (started runs finish; run again to resume)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state sizes, train nothing")
    p.add_argument("--report", action="store_true", help="rebuild the table and plots from finished runs only")
    p.add_argument("--restore", nargs="*", metavar="SWEEP_DIR", default=None,
                   help="first rebuild the result.json of runs that the sweep's results.csv lists, or those of these other "
                        "sweep directories (runs/ is not in git: a fresh clone resumes from the committed reports); no curves")

    def run(args) -> int:
        spec = load_spec(args.spec)
        out = Path(args.out or f"sweeps/{spec.name}")
        if args.restore is not None:
            print(f"[bla sweep] {spec.name}: {restore_runs(spec, out, args.restore)} runs restored from the results.csv "
                  f"of {[str(out), *args.restore]}", flush=True)  # fmt: skip
        if args.dry_run:
            for mixer, overrides in spec.runs():
                cfg = train_config(spec, overrides)
                done = (out / "runs" / run_name(spec, mixer, overrides) / "result.json").exists()
                print(f"{run_name(spec, mixer, overrides)} state={state_size(cfg.model, cfg.data.seq_len)['elements']:>9,} "
                      f"{'done' if done else 'todo'} {overrides}")  # fmt: skip
            return 0
        if args.report:
            report(spec, out)
            return 0
        try:
            run_sweep(spec, out, args.nproc, args.jobs, args.cache_dir, start_by=args.start_by)
        except SweepFailed as exc:  # each failure's log tail was printed as it came
            print(f"bla sweep: error: {exc}", file=sys.stderr)
            return 1
        return 0

    p.set_defaults(func=run)
