"""lm-evaluation-harness: the `bla` model class runs tasks defined on local files."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from bla.launch.layout import fresh_process_env

pytest.importorskip("lm_eval")

CONTAINS = '''
def process_results(doc, results):
    """EVAL.md's recall scoring: the answer appears (case-insensitive) in the generation."""
    return {"contains": float(doc["answer"].lower() in results[0].lower())}
'''


@pytest.fixture(scope="module")
def tasks(tiny_run):
    tasks = tiny_run / "tasks"
    tasks.mkdir()
    (tasks / "mc.jsonl").write_text("".join(json.dumps({"question": f"x = {i}\ny =", "choices": [" 1", " zq"], "answer": 0}) + "\n"
                                            for i in range(6)))  # fmt: skip
    (tasks / "gen.jsonl").write_text("".join(json.dumps({"prompt": f"def f{i}(", "answer": "self"}) + "\n" for i in range(4)))
    (tasks / "utils.py").write_text(CONTAINS)
    (tasks / "mc.yaml").write_text(textwrap.dedent(f"""\
        task: bla_test_mc
        dataset_path: json
        dataset_kwargs: {{data_files: {{test: {tasks / 'mc.jsonl'}}}}}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{answer}}}}"
        metric_list: [{{metric: acc}}]
        """))
    (tasks / "gen.yaml").write_text(textwrap.dedent(f"""\
        task: bla_test_gen
        dataset_path: json
        dataset_kwargs: {{data_files: {{test: {tasks / 'gen.jsonl'}}}}}
        test_split: test
        output_type: generate_until
        doc_to_text: "{{{{prompt}}}}"
        doc_to_target: "{{{{answer}}}}"
        generation_kwargs: {{until: ["\\n"], max_gen_toks: 12, do_sample: false}}
        process_results: !function utils.process_results
        metric_list: [{{metric: contains, aggregation: mean, higher_is_better: true}}]
        """))
    return tasks


def test_harness_runs_loglikelihood_and_generation_tasks(tiny_run, tasks):
    from bla.eval.harness import run_tasks

    results = run_tasks(str(tiny_run / "run"), ["bla_test_mc", "bla_test_gen"], include_path=str(tasks), batch_size=4)["results"]
    assert 0.0 <= results["bla_test_mc"]["acc,none"] <= 1.0
    assert 0.0 <= results["bla_test_gen"]["contains,none"] <= 1.0


def test_loglikelihood_matches_the_model(tiny_run):
    import torch

    from bla.eval.harness import BLAHarnessLM
    from bla.train.checkpoint import load_run

    # device=cuda is what lm_eval's command line passes by default: without a GPU it runs on the CPU
    lm = BLAHarnessLM(str(tiny_run / "run"), device="" if torch.cuda.is_available() else "cuda", max_length=1024)
    assert lm._device.type == ("cuda" if torch.cuda.is_available() else "cpu")  # one window: exactly the full forward
    model, tok, _ = load_run(tiny_run / "run")

    class Req:
        def __init__(self, *args):
            self.args = args

    context, cont = "import os\nimport sys\nfrom pathlib import Path\n", "def main():"
    (logp, _), = lm.loglikelihood([Req(context, cont)])
    ctx = [tok.bos_id, *tok.encode(context)]
    ids = torch.tensor([ctx + tok.encode(cont)])
    with torch.no_grad():
        full = torch.log_softmax(model(ids[:, :-1]).logits[0], -1)
    expected = float(full[len(ctx) - 1 :].gather(1, ids[0, len(ctx) :, None]).sum())
    assert logp == pytest.approx(expected, abs=1e-3)


def test_bla_eval_harness_takes_lm_evals_own_flags(tiny_run, tasks):
    """What a user types: lm-eval's flags (batch size, limit, output path) after --run; the device
    left to lm-eval's default (cuda), which runs on the CPU here."""
    out = tiny_run / "results"
    done = subprocess.run([sys.executable, "-m", "bla.launch.cli", "eval", "harness", "--run", str(tiny_run / "run"),
                           "--tasks", "bla_test_mc", "--include_path", str(tasks), "--batch_size", "4", "--limit", "4",
                           "--output_path", str(out), "--model_args", "max_length=512"],
                          capture_output=True, text=True, env=fresh_process_env(), timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    written = list(out.rglob("results*.json"))
    assert len(written) == 1, list(out.rglob("*"))
    result = json.loads(written[0].read_text())
    assert 0.0 <= result["results"]["bla_test_mc"]["acc,none"] <= 1.0
    assert result["config"]["batch_size"] in ("4", 4) and result["config"]["model_args"]["max_length"] == 512
    assert "bla_test_mc" in done.stdout  # lm-eval's own results table


def test_harness_argv_and_batch_size_errors():
    from bla.eval.harness import _batch_size, harness_argv

    assert harness_argv("r", ["--tasks", "x", "--model_args", "max_length=8"]) == \
        ["run", "--model", "bla", "--model_args", "run=r,max_length=8", "--tasks", "x"]  # fmt: skip
    with pytest.raises(ValueError, match="leave --model out"):
        harness_argv("r", ["--model", "hf"])
    assert _batch_size("auto", 1024) == 64 and _batch_size("8", 1024) == 8
    with pytest.raises(ValueError, match="batch_size must be a positive integer or 'auto'"):
        _batch_size("0", 1024)


def test_batched_scores_equal_one_at_a_time(tiny_run):
    from bla.eval.harness import BLAHarnessLM

    class Req:
        def __init__(self, *args):
            self.args = args

    lm = BLAHarnessLM(str(tiny_run / "run"), device="cpu", max_length=48, batch_size=3)
    reqs = [Req("import os\n" * n, " def f():") for n in (1, 7, 3, 2, 30)]  # the last one is longer than 48 tokens
    batched = lm.loglikelihood(reqs)
    alone = []
    for r in reqs:
        ctx = [lm.tok.bos_id, *lm.tok.encode(r.args[0])]
        alone.append(lm._logprobs(ctx + lm.tok.encode(r.args[1]), first=len(ctx)))
    assert len(ctx) > 48
    for (a, ga), (b, gb) in zip(batched, alone):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    rolling = lm.loglikelihood_rolling([Req(r.args[0]) for r in reqs])
    assert rolling == pytest.approx([lm._logprobs([lm.tok.bos_id, *lm.tok.encode(r.args[0])], 1)[0] for r in reqs], abs=1e-4)


def test_pretrained_names_the_model_and_unknown_model_args_are_refused(tiny_run, tasks, capsys):
    """lm-eval's own name for the model path, `pretrained=`, works (and names the results); an
    unknown model argument is one line and exit 2, never swallowed."""
    from bla.eval.harness import BLAHarnessLM, lm_eval_main

    with pytest.raises(ValueError, match=r"unknown model_args \['temprature'\]"):
        BLAHarnessLM(pretrained=str(tiny_run / "run"), temprature=0.5)
    with pytest.raises(ValueError, match="exactly one of pretrained=PATH or run=PATH"):
        BLAHarnessLM()
    out = tiny_run / "pretrained_results"
    base = [sys.executable, "-m", "bla.eval.harness", "--model", "bla", "--tasks", "bla_test_mc", "--include_path",
            str(tasks), "--limit", "2", "--output_path", str(out)]  # fmt: skip
    done = subprocess.run([*base, "--model_args", f"pretrained={tiny_run / 'run'}"], capture_output=True, text=True,
                          env=fresh_process_env(), timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    written = list(out.rglob("results*.json"))
    assert len(written) == 1 and "run" in written[0].parent.name  # lm-eval names the folder after pretrained=
    capsys.readouterr()  # the refusal through the same command line, in this process (lm-eval's imports once)
    assert lm_eval_main([*base[3:], "--model_args", f"pretrained={tiny_run / 'run'},bogus=1"]) == 2
    assert "unknown model_args ['bogus']" in capsys.readouterr().err.strip().splitlines()[-1]


def test_lm_evals_hf_model_on_an_export_scores_as_the_bla_adapter(tiny_run, tmp_path):
    """`lm_eval --model hf` on an export: loglikelihood tasks as the `bla` adapter by default, rolling
    perplexity only with add_bos_token=False (lm-eval puts its own <bos> before the tokenizer's)."""
    from lm_eval.models.huggingface import HFLM

    from bla.eval.harness import BLAHarnessLM
    from bla.train.export import export

    class Req:
        def __init__(self, *args):
            self.args = args

    hf_dir = export(tiny_run / "run", tmp_path / "hf")
    texts = [Req("import os\n" * 3), Req("def f(x):\n    return x\n")]
    pairs = [Req("x = 1\ny =", " 2"), Req("def g(", "self")]
    ours = BLAHarnessLM(pretrained=str(hf_dir), device="cpu", max_length=64)
    rolling, scores = ours.loglikelihood_rolling(texts), [s for s, _ in ours.loglikelihood(pairs)]

    def hf(**kw):
        return HFLM(pretrained=str(hf_dir), device="cpu", batch_size=2, max_length=64, trust_remote_code=True, **kw)

    default, no_bos = hf(), hf(add_bos_token=False)
    assert [s for s, _ in default.loglikelihood(pairs, disable_tqdm=True)] == pytest.approx(scores, abs=1e-4)
    assert no_bos.loglikelihood_rolling(texts, disable_tqdm=True) == pytest.approx(rolling, abs=1e-4)
    # the double <bos> the docs warn of: if lm-eval stops adding it, README's advice must change
    assert default.loglikelihood_rolling(texts, disable_tqdm=True)[0] != pytest.approx(rolling[0], abs=1e-2)
