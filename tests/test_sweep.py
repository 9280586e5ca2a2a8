"""bla sweep: a tiny MQAR sweep (2 mixers x 2 state sizes) trains, evaluates, reports and resumes;
the report's best-over-learning-rate and state-efficiency arithmetic on hand-made results."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from bla.launch.sweep import (
    SweepSpec, best_over_lr, child_visible_devices, job_gpus, load_spec, report, restore_runs, run_name, run_sweep,
    state_efficiency,
)  # fmt: skip

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_tiny_sweep_trains_reports_and_resumes(tmp_path):
    spec = load_spec("tiny")
    out = tmp_path / "sweep"
    summary = run_sweep(spec, out, jobs=2, cache_dir=str(tmp_path / "cache"), progress=False)  # two runs at a time
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 5 and summary["runs"] == 5
    state = {(r["mixer"], json.loads(r["model.bla.slots"] or "null"), json.loads(r["model.swa_window"] or "null")): int(r["state_elements"])
             for r in rows}  # fmt: skip
    # tiny MQAR model: 2 layers x 2 kv heads x (d_k + d_v = 32) per slot or per window position
    assert state == {("bla", 4, None): 512, ("bla", 8, None): 1024, ("bla_dirichlet", 4, None): 512, ("swa", None, 4): 512,
                     ("swa", None, 8): 1024}  # fmt: skip
    dirichlet = json.loads(next((out / "runs").glob("bla_dirichlet-*/result.json")).read_text())
    assert dirichlet["config"]["model"]["bla"]["gates"] == "dirichlet"  # a gates grid key reaches the run
    default = json.loads(next((out / "runs").glob("bla-*/result.json")).read_text())
    assert default["config"]["model"]["bla"]["gates"] == "fejer"  # two rules, not one twice
    assert all(p["selected_on"] == "val_accuracy" for p in summary["best_over_lr"])
    for r in rows:
        assert 0.0 <= float(r["accuracy"]) <= 1.0 and float(r["train_seconds"]) > 0
    assert (out / "accuracy_vs_state.png").stat().st_size > 10_000
    assert (out / "learning_curves.png").stat().st_size > 10_000  # every reported point's training loss
    from bla.launch.sweep import learning_curves

    for point in summary["best_over_lr"]:
        (steps, losses), = learning_curves(out, point)  # one seed
        assert steps[0] == 1 and len(steps) == len(losses) > 1
    assert set(json.loads((out / "state_efficiency.json").read_text())["0.05"]) == {"bla", "bla_dirichlet", "swa"}
    result = json.loads(next((out / "runs").glob("bla-*/result.json")).read_text())
    assert result["config"]["model"]["layer_pattern"] == ["bla"] and result["params"] > 0

    # resumable: finished runs are skipped; a run without its result is redone (from its checkpoint)
    redo = out / "runs" / run_name(spec, "swa", spec.runs()[-1][1]) / "result.json"
    redo.unlink()
    kept = {p: p.stat().st_mtime for p in (out / "runs").glob("*/result.json")}
    run_sweep(spec, out, cache_dir=str(tmp_path / "cache"), progress=False, start_by=0)  # past its start-by: nothing starts
    assert not redo.exists()
    run_sweep(spec, out, cache_dir=str(tmp_path / "cache"), progress=False)
    assert redo.exists() and all(p.stat().st_mtime == t for p, t in kept.items())


def _fake(spec: SweepSpec, out: Path, mixer: str, state: int, lr: float, acc: float | None, seed: int | None = None,
          val: float | None = None, diverged: str | None = None):  # fmt: skip
    overrides = {"size": state, "optim.lr": lr} | ({"seed": seed} if seed is not None else {})
    d = out / "runs" / run_name(spec, mixer, overrides)
    d.mkdir(parents=True)
    result = {"run": d.name, "mixer": mixer, "overrides": overrides, "state_elements": state, "state_bytes": 2 * state,
              "params": 1, "accuracy": acc, "loss": 1.0} | ({"val_accuracy": val} if val is not None else {})  # fmt: skip
    if diverged:
        result["diverged"] = diverged
    (d / "result.json").write_text(json.dumps(result))


def test_best_over_lr_and_state_efficiency(tmp_path):
    bla = [{"size": s, "optim.lr": lr} for s in (64, 128) for lr in (1e-3, 3e-3)]
    swa = [{"size": s, "optim.lr": 1e-3} for s in (128, 512, 1024)]
    spec = SweepSpec("fake", "mqar", {"bla": bla, "swa": swa, "gsa": [{"size": 1024, "optim.lr": 1e-3}]}, targets=[0.5, 0.9])
    for state, accs in {64: (0.2, 0.6), 128: (0.7, 0.95)}.items():
        for lr, acc in zip((1e-3, 3e-3), accs):
            _fake(spec, tmp_path, "bla", state, lr, acc)
    for state, acc in {128: 0.3, 512: 0.55, 1024: 0.92}.items():
        _fake(spec, tmp_path, "swa", state, 1e-3, acc)
    _fake(spec, tmp_path, "gsa", 1024, 1e-3, 0.4)
    _fake(spec, tmp_path, "swa", 2048, 1e-3, 0.99)  # not in the spec: left out of the report
    results = [json.loads(p.read_text()) for p in tmp_path.glob("runs/*/result.json")]
    points = best_over_lr(spec, [r for r in results if r["state_elements"] != 2048])
    assert [(p["mixer"], p["state_elements"], p["accuracy"]) for p in points if p["mixer"] == "bla"] == [("bla", 64, 0.6), ("bla", 128, 0.95)]
    eff = state_efficiency(spec, points)
    assert eff["0.5"]["bla"] == {"state_elements": 64, "times_less_than_swa": 8.0}
    assert eff["0.9"]["bla"] == {"state_elements": 128, "times_less_than_swa": 8.0}
    assert eff["0.9"]["swa"]["times_less_than_swa"] == 1.0
    assert eff["0.5"]["gsa"] == {"state_elements": None, "times_less_than_swa": None}
    summary = report(spec, tmp_path)
    edited = SweepSpec("fake", "mqar", spec.mixers, overrides=["steps=7"])  # shared settings changed: new runs
    assert run_name(edited, "bla", bla[0]) != run_name(spec, "bla", bla[0])
    assert summary["runs"] == 8 and (tmp_path / "accuracy_vs_state.png").exists()


def test_seeds_are_averaged_before_the_best_learning_rate_is_taken(tmp_path):
    spec = SweepSpec("fake", "mqar", {"bla": [{"size": 64}]}, grid={"optim.lr": [1e-3, 3e-3], "seed": [0, 1]})
    for lr, accs in {1e-3: (0.9, 0.1), 3e-3: (0.6, 0.7)}.items():  # 1e-3 has the best single run, 3e-3 the best mean
        for seed, acc in enumerate(accs):
            _fake(spec, tmp_path, "bla", 64, lr, acc, seed)
    (point,) = best_over_lr(spec, [json.loads(p.read_text()) for p in tmp_path.glob("runs/*/result.json")])
    assert point["overrides"] == {"size": 64, "optim.lr": 3e-3} and point["seeds"] == 2 and len(point["run"].split(",")) == 2
    assert point["accuracy"] == pytest.approx(0.65) and (point["accuracy_min"], point["accuracy_max"]) == (0.6, 0.7)
    summary = report(spec, tmp_path)
    assert summary["best_over_lr"][0]["seeds"] == 2 and (tmp_path / "accuracy_vs_state.png").exists()


def test_a_rate_at_which_a_seed_diverged_is_not_chosen(tmp_path):
    """Averaging only the seeds that survived would flatter a rate that fails one run in three."""
    spec = SweepSpec("fake", "mqar", {"bla": [{"size": 64}]}, grid={"optim.lr": [1e-3, 3e-3], "seed": [0, 1]})
    _fake(spec, tmp_path, "bla", 64, 1e-3, 0.5, seed=0)
    _fake(spec, tmp_path, "bla", 64, 1e-3, 0.6, seed=1)
    _fake(spec, tmp_path, "bla", 64, 3e-3, 0.9, seed=0)  # the best surviving mean ...
    _fake(spec, tmp_path, "bla", 64, 3e-3, None, seed=1, diverged="stopped on 20 non-finite losses in a row")  # ... but
    (point,) = best_over_lr(spec, [json.loads(p.read_text()) for p in tmp_path.glob("runs/*/result.json")])
    assert point["overrides"]["optim.lr"] == 1e-3 and point["seeds"] == 2


def test_the_learning_rate_is_chosen_on_validation_not_on_the_test(tmp_path):
    spec = SweepSpec("fake", "mqar", {"bla": [{"size": 64}]}, grid={"optim.lr": [1e-3, 3e-3]})
    _fake(spec, tmp_path, "bla", 64, 1e-3, acc=0.9, val=0.5)  # the best test accuracy, the worse validation
    _fake(spec, tmp_path, "bla", 64, 3e-3, acc=0.7, val=0.6)
    (point,) = best_over_lr(spec, [json.loads(p.read_text()) for p in tmp_path.glob("runs/*/result.json")])
    assert point["overrides"]["optim.lr"] == 3e-3 and point["selected_on"] == "val_accuracy"
    assert point["accuracy"] == 0.7 and point["val_accuracy"] == 0.6  # the test figure reported, not chosen on


def test_a_fresh_clone_restores_finished_runs_from_the_committed_report(tmp_path):
    """runs/ is not in git, results.csv is: the runs it lists are not trained again, and the
    report rebuilt from restored runs is the one they were restored from."""
    import shutil

    spec = SweepSpec("fake", "mqar", {"bla": [{"size": 64}, {"size": 128}]}, grid={"optim.lr": [1e-3, 3e-3], "seed": [0]})
    _fake(spec, tmp_path, "bla", 64, 1e-3, 0.4, seed=0, val=0.45)
    _fake(spec, tmp_path, "bla", 64, 3e-3, None, seed=0, diverged="stopped on 20 non-finite losses in a row")
    _fake(spec, tmp_path, "bla", 128, 1e-3, 0.8, seed=0, val=0.75)  # (128, 3e-3) not run yet
    first = report(spec, tmp_path)
    table = (tmp_path / "results.csv").read_text()
    shutil.rmtree(tmp_path / "runs")
    assert restore_runs(spec, tmp_path) == 3 and restore_runs(spec, tmp_path) == 0  # never overwrites
    todo = [o for m, o in spec.runs() if not (tmp_path / "runs" / run_name(spec, m, o) / "result.json").exists()]
    assert todo == [{"size": 128, "optim.lr": 3e-3, "seed": 0}]
    again = report(spec, tmp_path)
    assert (tmp_path / "results.csv").read_text() == table
    assert again["best_over_lr"] == first["best_over_lr"] and again["diverged"] == first["diverged"]
    restored = json.loads(next((tmp_path / "runs").glob("*/result.json")).read_text())
    assert restored["restored_from"].endswith("results.csv")
    other = SweepSpec("seeds", "mqar", {"bla": [{"size": 64}]}, grid={"optim.lr": [1e-3], "seed": [0, 1]})
    assert restore_runs(other, tmp_path / "seeds", [tmp_path]) == 1  # seed 0 is the first sweep's run: shared by name
    with pytest.raises(FileNotFoundError, match="no results.csv in"):
        restore_runs(other, tmp_path / "seeds", [tmp_path / "nowhere"])

    shutil.rmtree(tmp_path / "runs")  # a row that does not match the spec's run of that name: refused
    (tmp_path / "results.csv").write_text(table.replace("bla,", "swa,", 1))
    with pytest.raises(ValueError, match="was the file edited"):
        restore_runs(spec, tmp_path)


@pytest.mark.parametrize(
    "text, match",
    [
        ("name: x\npreset: mqar\nmixers: {bla: [{}]}\nbogus: 1\n", "unknown keys"),
        ("name: x\npreset: mqar\n", "missing 'mixers'"),
        ("name: x\npreset: mqar\nmixers: {bla: {model.bla.slots: [5]}}\n", "bla.slots=5 must divide"),
        ("name: x\npreset: mqar\nmixers: {bla: {optim.lr: []}}\n", "non-empty list"),
        ("name: x\npreset: mqar\nmixers: {bla: [{}]}\nmetric: f1\n", "metric must be one of"),
        ("name: x\npreset: mqar\nmixers: {bla: [{}]}\ntargets: [0.5]\n", "baseline 'swa' is not one of its mixers"),
        ("name: x\npreset: mqar\nmixers: {bla: [{}]}\npinned: model.bla.gates=dirichlet\n", "pinned must be a list of key=value"),
    ],
)
def test_bad_specs_are_refused(tmp_path, text, match):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_spec(str(path))


def test_named_sweeps_and_experiments_load_and_are_valid():
    """The sweeps a user starts from ship with the package; the experiments' specs (run by path)
    stay valid too: each run's training config validates."""
    from bla.launch.sweep import named_sweeps, train_config

    with pytest.raises(ValueError, match="named sweeps: .*mqar_paper_budget"):
        load_spec("nope")
    assert named_sweeps() == ["lm_state", "lm_state_40m", "mqar_paper", "mqar_paper_budget", "regbench_paper", "regbench_v2", "tiny"]
    experiments = sorted((ROOT / "experiments" / "sweeps").glob("*.yaml"))
    assert len(experiments) >= 20
    for spec in [load_spec(name) for name in named_sweeps()] + [load_spec(str(path)) for path in experiments]:
        assert spec.runs(), spec.name
        for mixer, overrides in spec.runs():
            train_config(spec, overrides).validate()
    for name in ("tiny", "mqar_paper", "regbench_paper", "regbench_v2"):
        assert {"bla", "swa"} <= set(load_spec(name).mixers)


def test_jobs_get_their_own_gpus_when_there_are_enough():
    assert job_gpus(4, 2, 8) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert job_gpus(3, 1, 8) == [[0], [1], [2]]
    assert job_gpus(4, 1, 1) == [None] * 4  # one GPU: the jobs share it
    assert job_gpus(2, 1, 0) == [None, None]  # CPU
    assert job_gpus(1, 1, 8) == [None]  # one job: torch's default device, as without --jobs
    assert child_visible_devices([2, 3], None) == "2,3"
    assert child_visible_devices([0, 1], "4,5,6,7") == "4,5"  # relative to what the sweep itself sees


def test_bad_jobs_refused(tmp_path):
    with pytest.raises(ValueError, match="--jobs and --nproc must be >= 1"):
        run_sweep(load_spec("tiny"), tmp_path, jobs=0)
    with pytest.raises(ValueError, match="--start-by must be >= 0"):
        run_sweep(load_spec("tiny"), tmp_path, start_by=-1)


def test_gates_are_a_grid_key(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("name: g\npreset: mqar\nmixers: {bla: {model.layer_pattern: [[bla]], model.bla.gates: [dirichlet, fejer, "
                    "dirichlet_v1]}}\ngrid: {optim.lr: [1.0e-3]}\n")  # fmt: skip
    spec = load_spec(str(path))
    runs = spec.runs()
    from bla.launch.sweep import train_config

    assert [train_config(spec, o).model.bla.gates for _, o in runs] == ["dirichlet", "fejer", "dirichlet_v1"]
    assert len({run_name(spec, m, o) for m, o in runs}) == 3
    path.write_text("name: g\npreset: mqar\nmixers: {bla: {model.bla.gates: [v3]}}\n")
    with pytest.raises(ValueError, match="bla.gates must be one of"):
        load_spec(str(path))


def test_a_pinned_default_is_trained_but_keeps_the_run_names():
    """A sweep that ran before the model's default gates changed pins the old rule: its runs train
    with it, and their names (those of its committed report) do not change."""
    import dataclasses

    from bla.launch.sweep import train_config

    spec = load_spec(str(ROOT / "experiments" / "sweeps" / "mqar_ablations.yaml"))
    assert spec.pinned == ["model.bla.gates=dirichlet"]
    mixer, overrides = spec.runs()[0]
    assert train_config(spec, overrides).model.bla.gates == "dirichlet"
    unpinned = dataclasses.replace(spec, pinned=[])
    assert train_config(unpinned, overrides).model.bla.gates == "fejer"  # today's default
    assert run_name(spec, mixer, overrides) == run_name(unpinned, mixer, overrides)
    report = ROOT / "experiments" / "results" / "mqar_ablations" / "results.csv"
    with open(report) as f:
        committed = {row["run"] for row in csv.DictReader(f)}
    assert committed <= {run_name(spec, m, o) for m, o in spec.runs()}


def test_a_diverged_run_is_a_result_not_an_error(tmp_path):
    """A learning rate at which training stops on non-finite losses is an outcome of the sweep: the
    run is recorded as diverged, without metrics (so never selected: best_over_lr skips those),
    listed in the report, and the sweep goes on."""
    path = tmp_path / "d.yaml"
    path.write_text("name: d\npreset: mqar\noverrides: [steps=6, micro_batch=8, data.seq_len=32, data.mqar.num_kv_pairs=2, "
                    "data.mqar.vocab_size=64, model.vocab_size=64, model.d_model=32, model.n_heads=2, eval_every=6, "
                    "eval_batches=1, save_every=6, optim.warmup_steps=1, nonfinite_limit=2, optim.grad_clip=0]\n"
                    "mixers: {swa: {model.layer_pattern: [[swa]], model.swa_window: [4]}}\n"
                    "grid: {optim.lr: [1.0e+30]}\neval: {examples: 20}\ntargets: [0.5]\nbaseline: swa\n")  # fmt: skip
    spec = load_spec(str(path))
    summary = run_sweep(spec, tmp_path / "out", cache_dir=str(tmp_path / "cache"), progress=False)
    assert summary["runs"] == 1 and summary["best_over_lr"] == []
    (bad,) = summary["diverged"]
    assert bad["overrides"]["optim.lr"] == 1e30 and "non-finite" in bad["status"]
    row = next(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert row["accuracy"] == "" and "non-finite" in row["diverged"]


def test_a_failed_run_costs_only_itself(tmp_path, monkeypatch):
    """A run whose training process fails (on the GPU: a device fault in one configuration) does
    not stop the others: they train and are reported, then the sweep fails naming the run and its
    log; run again, it trains only the failed run."""
    from bla.launch import sweep as sweep_module

    path = tmp_path / "f.yaml"
    path.write_text("name: f\npreset: mqar\noverrides: [steps=2, micro_batch=4, data.seq_len=32, data.mqar.num_kv_pairs=2, "
                    "data.mqar.vocab_size=64, model.vocab_size=64, model.d_model=32, model.n_heads=2, eval_every=2, "
                    "eval_batches=1, save_every=2, optim.warmup_steps=1]\n"
                    "mixers: {swa: {model.layer_pattern: [[swa]], model.swa_window: [4, 8]}}\n"
                    "grid: {optim.lr: [1.0e-3]}\neval: {examples: 8}\ntargets: [0.5]\nbaseline: swa\n")  # fmt: skip
    spec = load_spec(str(path))
    real_train, trained = sweep_module._train, []

    def train_failing_window_4(spec, overrides, out, cache_dir, nproc, log_file, env):
        trained.append(overrides["model.swa_window"])
        if overrides["model.swa_window"] == 4 and len(trained) <= 2:
            log_file.write_text("CUDA error: an illegal memory access was encountered\n")
            raise sweep_module.RunFailed(out.name, log_file, f"training run {out.name} failed (exit 1)")
        real_train(spec, overrides, out, cache_dir, nproc, log_file, env)

    monkeypatch.setattr(sweep_module, "_train", train_failing_window_4)
    out = tmp_path / "out"
    with pytest.raises(sweep_module.SweepFailed, match=r"1 of 2 runs failed: swa-\w+ \(log .*train.log\)"):
        run_sweep(spec, out, cache_dir=str(tmp_path / "cache"), progress=False)
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [row["model.swa_window"] for row in rows] == ["8"] and rows[0]["accuracy"] != ""
    summary = run_sweep(spec, out, cache_dir=str(tmp_path / "cache"), progress=False)  # again: only the failed run trains
    assert sorted(trained) == [4, 4, 8] and summary["runs"] == 2


def test_an_lm_sweep_reports_bits_per_byte_and_the_loss_by_position(tmp_path):
    """Language-modelling runs add bits per byte and the validation loss by position in the
    document (issue 44: does a state carry information past its window?), drawn per mixer."""
    path = tmp_path / "lm.yaml"
    path.write_text("name: lm\npreset: tiny\noverrides: [steps=2, eval_every=2, save_every=2, eval_batches=1, log_every=1]\n"
                    "mixers: {bla: {model.layer_pattern: [[bla]]}}\ngrid: {optim.lr: [1.0e-3]}\n"
                    "metric: loss\neval: {docs: 3}\nbaseline: bla\n")  # fmt: skip
    out = tmp_path / "out"
    summary = run_sweep(load_spec(str(path)), out, cache_dir=str(tmp_path / "cache"), progress=False)
    (point,) = summary["best_over_lr"]
    buckets = point["loss_by_position"]
    assert point["bits_per_byte"] > 0 and buckets[0]["from"] == 0 and all(a["to"] == b["from"] for a, b in zip(buckets, buckets[1:]))
    assert (out / "loss_by_position.png").stat().st_size > 10_000
    assert float(next(csv.DictReader(open(out / "results.csv")))["bits_per_byte"]) == pytest.approx(point["bits_per_byte"])


def test_the_loss_by_position_of_a_point_is_its_seeds_mean(tmp_path):
    spec = SweepSpec(name="t", preset="tiny", mixers={"bla": [{"size": 1}]}, grid={"optim.lr": [1e-3]}, metric="loss")
    runs = [{"run": f"r{i}", "mixer": "bla", "overrides": {"size": 1, "optim.lr": 1e-3, "seed": i}, "state_elements": 1,
             "loss": loss, "loss_by_position": [{"from": 0, "to": 64, "tokens": 9, "loss": loss}, *extra]}
            for i, (loss, extra) in enumerate([(2.0, [{"from": 64, "to": 128, "tokens": 5, "loss": 1.0}]), (4.0, [])])]  # fmt: skip
    (point,) = best_over_lr(spec, runs)
    assert point["loss_by_position"] == [{"from": 0, "to": 64, "tokens": 9, "loss": 3.0}]  # buckets every seed has


def test_the_lm_state_sweeps_dry_run(capsys):
    """Issue 44's LM law over state: the two sizes' specs list their runs and state sizes (every
    mixer of the comparison, both BLA windows, the hybrids), about 11M and 43M non-embedding
    parameters, within two epochs of the embedded corpus."""
    from bla.launch.cli import main
    from bla.launch.sweep import train_config
    from bla.model import param_count

    for name, size in (("lm_state", 11e6), ("lm_state_40m", 43e6)):
        assert main(["sweep", name, "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert out.count("state=") == 81 and all(f"{m}-" in out for m in ("bla", "bla_w512", "swa", "gsa", "attn", "bla_attn", "bla_swa"))
        spec = load_spec(name)
        cfg = train_config(spec, spec.runs()[0][1])
        assert abs(param_count(cfg.model, include_embeddings=False) - size) < 0.05 * size
        assert cfg.steps * cfg.micro_batch * cfg.data.seq_len <= 2 * 9.3e6  # at most ~2 epochs of the corpus


def test_a_loss_sweep_fits_a_law_per_mixer_and_matches_the_peers(tmp_path):
    """Issue 44's law: loss = a + b * state^-c per mixer with three or more state sizes, recovered
    from points that follow one; the state each fitted mixer needs for every peer's loss; none
    below the law's asymptote."""
    spec = SweepSpec("law", "tiny", {"bla": [{"size": s} for s in (1024, 2048, 4096, 8192, 16384)],
                                     "swa": [{"size": s} for s in (2048, 8192, 32768)], "attn": [{"size": 65536}]},
                     grid={"optim.lr": [1e-3]}, metric="loss")  # fmt: skip
    truth = {"bla": (3.0, 40.0, 0.5), "swa": (3.0, 80.0, 0.5)}  # SWA needs 4x BLA's state for any loss above 3

    def loss(mixer, state):
        a, b, c = truth.get(mixer, (2.9, 0.0, 1.0))
        return a + b * state**-c

    for mixer, configs in spec.mixers.items():
        for o in configs:
            _fake(spec, tmp_path, mixer, o["size"], 1e-3, acc=None)
            result = next(tmp_path.glob(f"runs/{run_name(spec, mixer, {**o, 'optim.lr': 1e-3})}/result.json"))
            result.write_text(json.dumps({**json.loads(result.read_text()), "loss": loss(mixer, o["size"])}))
    summary = report(spec, tmp_path)
    laws = json.loads((tmp_path / "laws.json").read_text())
    assert laws == json.loads(json.dumps(summary["laws"])) and sorted(laws["laws"]) == ["bla", "swa"]  # attn: one state
    bla = laws["laws"]["bla"]
    assert (bla["a"], bla["b"], bla["c"]) == pytest.approx(truth["bla"], rel=1e-4) and bla["rmse"] < 1e-6
    to_swa = [m for m in laws["matches"]["bla"] if m["peer"] == "swa"]
    assert [m["times_less_state"] for m in to_swa] == pytest.approx([4.0] * 3, rel=1e-3)
    assert [m["extrapolated"] for m in to_swa] == [True, False, False]  # 2048 / 4 = 512: below BLA's smallest state
    (attn,) = [m for m in laws["matches"]["bla"] if m["peer"] == "attn"]
    assert attn["state"] is None  # 2.9 lies below BLA's asymptote 3.0


def test_a_law_recovers_its_exponent_through_noise_and_refuses_bad_points():
    import random

    from bla.launch.laws import fit_power_law, state_for

    random.seed(0)
    states = [6144 * 2**i for i in range(6)]
    law = fit_power_law(states, [3.1 + 40 * s**-0.45 + random.gauss(0, 0.003) for s in states])
    assert law["c"] == pytest.approx(0.45, abs=0.05) and 0.0005 < law["rmse"] < 0.01 and law["points"] == 6
    assert state_for(law, law["a"] + law["b"] * 50_000 ** -law["c"]) == pytest.approx(50_000)
    assert fit_power_law([1024, 2048], [4.0, 3.5]) is None  # two states: no law
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([0, 1, 2], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="finite"):
        fit_power_law([1, 2, 4], [1.0, float("nan"), 1.0])
