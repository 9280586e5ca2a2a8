"""bla export: a ZeRO-3 2-process checkpoint to safetensors and a Hugging Face model directory,
loaded by transformers alone (bla hidden), with logits and greedy generation equal to ours."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bla.launch.layout import fresh_process_env
from bla.eval.generate import generate
from bla.train.checkpoint import load_run
from bla.train.export import load_exported
from bla.launch.cli import main as bla
from bla.train.export import export, flatten_imports, write_export

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

PROMPT = "def main():\n    return"
NEW_TOKENS = 12

# Runs with `bla` made unimportable: the export directory must carry everything the model needs.
HF_SIDE = textwrap.dedent('''
    import importlib.abc, json, sys
    class HideBla(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "bla" or name.startswith("bla."):
                raise ImportError("bla is hidden from this process")
    sys.meta_path.insert(0, HideBla())
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path, out, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    ids = tok(sys.argv[4], return_tensors="pt").input_ids
    seen = []  # the tokens the model reads in each forward of generate()
    inner = model.model.forward
    def counting(input_ids, *a, **k):
        seen.append(input_ids.shape[1])
        return inner(input_ids, *a, **k)
    model.model.forward = counting
    cache_of = lambda g: getattr(g, "cache", None) or g.past_key_values
    with torch.no_grad():
        logits = model(ids).logits
        short = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        seen.clear()
        long = model.generate(ids, max_new_tokens=int(sys.argv[5]), do_sample=False, return_dict_in_generate=True)
        steps = list(seen)
        beam = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False, output_scores=True,
                              return_dict_in_generate=True, length_penalty=1.0)
        tok.padding_side = "left"  # prompts of other lengths in one batch, each at its own position
        prompts = [sys.argv[4], "x", "import os\\nimport sys\\nfrom pathlib import Path\\n"]
        kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)  # no row ends early
        batch = model.generate(**tok(prompts, return_tensors="pt", padding=True), **kw)
        alone = [model.generate(**tok(p, return_tensors="pt"), **kw)[0, -8:] for p in prompts]
        model.static_decoding = True  # the CUDA-graph path's eager twin, on the CPU
        static_long = model.generate(ids, max_new_tokens=int(sys.argv[5]), do_sample=False)
        static_batch = model.generate(**tok(prompts, return_tensors="pt", padding=True), **kw)
        static_beam = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False, length_penalty=1.0)
        model.static_decoding = None
    cache_bytes = [[l.nbytes() for l in cache_of(g).decode.layers] for g in (short, long)]
    try:  # asked for, never silently None
        model(ids, output_hidden_states=True)
        hidden = "returned"
    except ValueError as exc:
        hidden = str(exc)
    model.train()  # gradient checkpointing (transformers' switch): the same loss and gradients
    losses, grads = [], []
    for enable in (False, True):
        model.gradient_checkpointing_enable() if enable else model.gradient_checkpointing_disable()
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        losses.append(float(loss))
        grads.append(model.model.embed.weight.grad.clone())
    checkpointing = [losses[0] == losses[1], bool(torch.allclose(grads[0], grads[1], atol=1e-6)), model.is_gradient_checkpointing]
    torch.save({"hidden": hidden, "checkpointing": checkpointing, "ids": ids, "logits": logits, "generated": long.sequences, "cache_bytes": cache_bytes, "steps": steps,
                "kinds": [type(l).__name__ for l in cache_of(long).decode.layers], "batch": batch[:, -8:],
                "alone": torch.stack(alone), "beam": beam.sequences, "beam_score": beam.sequences_scores * 6,
                "static_generated": static_long, "static_batch": static_batch[:, -8:], "static_beam": static_beam, "bla_loaded": "bla" in sys.modules}, out)
''')


def _env() -> dict:
    return fresh_process_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("export")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29713",
           "-m", "bla.train.cli", "tiny", f"out_dir={tmp / 'run'}", f"cache_dir={tmp / 'cache'}", "zero_stage=3",
           "steps=4", "save_every=4", "eval_every=4", "optim.lr=1e-2", "optim.warmup_steps=1"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return tmp


def _hf_side(path: Path, dtype: str = "float32") -> dict:
    out = path.parent / f"{path.name}_{dtype}_hf.pt"
    done = subprocess.run([sys.executable, "-c", HF_SIDE, str(path), str(out), dtype, PROMPT, str(NEW_TOKENS)],
                          capture_output=True, text=True, env=_env(), timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-5000:]
    return torch.load(out)


def test_transformers_matches_the_training_model(zero3_run):
    run = zero3_run / "run"
    assert json.loads((run / "summary.json").read_text())["zero_stage"] == 3
    hf_dir = export(run, zero3_run / "hf")
    hf = _hf_side(hf_dir)
    assert not hf["bla_loaded"]

    model, tok, _ = load_run(run)
    ids = torch.tensor([[tok.bos_id, *tok.encode(PROMPT)]])
    assert torch.equal(hf["ids"], ids)  # the Hugging Face tokenizer encodes as ours, <bos> first as in training
    with torch.no_grad():
        ours = model(ids).logits
    torch.testing.assert_close(hf["logits"], ours, rtol=1e-5, atol=1e-5)
    assert "does not return hidden_states" in hf["hidden"]
    assert hf["checkpointing"] == [True, True, True]  # gradient_checkpointing_enable(): same loss and gradients
    assert torch.equal(hf["generated"], generate(model, ids, NEW_TOKENS))  # greedy == bla generate
    # beam search reorders the cache: the best beam's score is its log-likelihood under a full forward
    beam = hf["beam"]
    with torch.no_grad():
        logp = model(beam).logits.log_softmax(-1)[0, ids.shape[1] - 1 : -1].gather(-1, beam[0, ids.shape[1] :, None])
    torch.testing.assert_close(hf["beam_score"], logp.sum()[None], rtol=1e-5, atol=1e-4)

    # BLA layers keep a constant-size state; attention's cache grows, the sliding window's is bounded
    short, long = hf["cache_bytes"]
    assert set(hf["kinds"]) == {"BLACache", "KVCache"}
    bla_layers = [i for i, kind in enumerate(model.cfg.mixers) if kind == "bla"]
    assert bla_layers and all(short[i] == long[i] > 0 for i in bla_layers)
    assert long[model.cfg.mixers.index("attn")] > short[model.cfg.mixers.index("attn")]
    # generate() reads the prompt once, then one token per step: never the prefix again
    assert hf["steps"] == [ids.shape[1]] + [1] * (hf["generated"].shape[1] - ids.shape[1] - 1)
    # a left-padded batch of prompts of other lengths: each row as it is alone (greedy)
    assert torch.equal(hf["batch"], hf["alone"])
    # the static-buffer decoding (bla.model.decode, CUDA graphs on a GPU) generates the same
    assert torch.equal(hf["static_generated"], hf["generated"])
    assert torch.equal(hf["static_batch"], hf["batch"])
    assert torch.equal(hf["static_beam"], hf["beam"])  # beam search reorders the static buffers' rows


def test_bf16_export(zero3_run):
    hf_dir = export(zero3_run / "run", zero3_run / "hf_bf16", dtype="bfloat16")
    from safetensors import safe_open

    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((hf_dir / "config.json").read_text())["dtype"] == "bfloat16"
    hf = _hf_side(hf_dir, "bfloat16")
    model, _, _ = load_run(zero3_run / "run")
    with torch.no_grad():
        ours = model(hf["ids"]).logits
    assert hf["logits"].dtype == torch.bfloat16
    assert (hf["logits"].float() - ours).abs().max() < 0.05 * ours.abs().max()


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in path.iterdir() if p.name != "bla_export.json"}


def test_round_trip_is_identical(zero3_run):
    first = export(zero3_run / "run", zero3_run / "rt1")
    model, tok, train_cfg = load_exported(first)
    second = write_export(model, tok, zero3_run / "rt2", info={"train_config": train_cfg})
    assert _files(first) == _files(second)
    assert bla(["export", str(first), str(zero3_run / "rt3")]) == 0  # an export re-exported by the CLI
    assert _files(first) == _files(zero3_run / "rt3")
    info = json.loads((zero3_run / "rt3" / "bla_export.json").read_text())
    assert info["source"]["from"]["checkpoint"].endswith("step_0000004")
    assert info["train_config"]["zero_stage"] == 3


def test_export_continues_training_with_the_same_weights(zero3_run):
    """init_from an export with a learning rate too small to move a weight (lr=0 is refused): the
    run's weights are the exported ones."""
    hf_dir = zero3_run / "hf"
    if not hf_dir.exists():
        export(zero3_run / "run", hf_dir)
    out = zero3_run / "continued"
    done = subprocess.run([sys.executable, "-m", "bla.train.cli", "tiny", f"out_dir={out}", f"cache_dir={zero3_run / 'cache'}",
                           f"init_from={hf_dir}", "steps=1", "optim.lr=1e-30", "optim.warmup_steps=0", "save_every=1"],
                          capture_output=True, text=True, env=_env(), timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-5000:]
    assert "initial weights from" in done.stdout + done.stderr
    assert "tokenising" not in done.stdout  # the export's tokenizer encodes as the run's: its shards are reused
    continued, _, _ = load_run(out)
    exported, _, _ = load_exported(hf_dir)
    for (name, a), b in zip(continued.state_dict().items(), exported.state_dict().values()):
        assert torch.equal(a, b), name


def test_an_export_without_its_training_record_evaluates(zero3_run, tmp_path):
    """What transformers' save_pretrained leaves (no bla_export.json): perplexity runs when told the
    data, and otherwise says what to pass."""
    hf_dir = zero3_run / "hf"
    if not hf_dir.exists():
        export(zero3_run / "run", hf_dir)
    bare = tmp_path / "resaved"
    shutil.copytree(hf_dir, bare)
    (bare / "bla_export.json").unlink()
    ppl = [sys.executable, "-m", "bla.launch.cli", "eval", "perplexity", "--run", str(bare), "--max-docs", "2"]
    done = subprocess.run(ppl, capture_output=True, text=True, env=_env(), timeout=600)
    assert done.returncode == 2 and "pass --source" in done.stderr.strip().splitlines()[-1], done.stderr[-2000:]
    done = subprocess.run([*ppl, "--source", "stdlib:validation", "--context", "32"], capture_output=True, text=True,
                          env=_env(), timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout[done.stdout.index("{") :])["docs"] == 2


def test_clear_errors(zero3_run, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        export(tmp_path / "nowhere", tmp_path / "x")
    broken = tmp_path / "run"
    shutil.copytree(zero3_run / "run", broken)
    (broken / "checkpoints" / "step_0000004" / "complete.json").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        export(broken / "checkpoints" / "step_0000004", tmp_path / "x")
    with pytest.raises(ValueError, match="no complete checkpoint"):
        export(broken, tmp_path / "x")

    hf_dir = export(zero3_run / "run", tmp_path / "hf")
    with pytest.raises(ValueError, match="exists"):
        export(zero3_run / "run", hf_dir)
    weights = hf_dir / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one flipped bit, same size
    with pytest.raises(ValueError, match="model.safetensors has changed since it was exported"):
        load_exported(hf_dir)
    assert bla(["eval", "perplexity", "--run", str(hf_dir)]) == 2  # one line, no traceback
    config = json.loads((hf_dir / "config.json").read_text())
    config["bla_model"]["n_layers"] = 4
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json has changed since it was exported"):
        load_exported(hf_dir)
    info = json.loads((hf_dir / "bla_export.json").read_text())
    del info["files"]  # as exports written before checksums: nothing to compare with
    (hf_dir / "bla_export.json").write_text(json.dumps(info))
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        load_exported(hf_dir)
    weights.write_bytes(good)
    with pytest.raises(ValueError, match="does not match its model config: missing .*blocks.3"):
        load_exported(hf_dir)
    config["bla_model"]["n_layers"], config["bla_model"]["d_model"] = 3, 128
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="wrong shapes"):
        load_exported(hf_dir)
    (hf_dir / "config.json").write_text('{"model_type": ')
    with pytest.raises(ValueError, match=r"config.json: not JSON"):
        load_exported(hf_dir)
    assert bla(["export", str(tmp_path / "nowhere"), str(tmp_path / "y")]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_flatten_imports_refuses_what_it_cannot_carry():
    assert "from .bla_checks import Problem" in flatten_imports("from .checks import Problem\n", "m")
    assert "from .bla_api import bla_step" in flatten_imports("from bla.kernels import bla_step\n", "m")
    with pytest.raises(ValueError, match="does not carry"):
        flatten_imports("from .benchmark import x\n", "m")
    with pytest.raises(ValueError, match="absolute bla imports"):
        flatten_imports("from bla.data import Tokenizer\n", "m")


def test_sentencepiece_tokenizer_export(tmp_path):
    from transformers import AutoTokenizer

    from bla.data.sources import stdlib_files
    from bla.data.tokenizer import train_tokenizer
    from bla.train.export import _write_tokenizer

    texts = [Path(f).read_text() for f in stdlib_files("validation")[:40]]
    ours = train_tokenizer(texts, tmp_path / "sp", kind="sentencepiece", vocab_size=400)
    _write_tokenizer(ours, tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in texts[:10] + ["def main():\n    return  x\t\ty", "héllo wörld 日本"]:
        ids = ours.encode(text)
        assert hf(text, add_special_tokens=False).input_ids == ids
        assert hf.decode(ids) == text
