#!/usr/bin/env bash
# The GPU measurements of issues 18 and 21 (and the GPU tests they add), as run on the device
# machine: `bash benchmarks/gpu_run.sh STAGE...` from the repo root, logs under $OUT.
# The machine has torch and Triton; DeepSpeed and its missing needs travel as wheels in .whl.
# The device tool returns at most 8 files from $OUT a call: stages run together must write no more.
set -o pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -d .whl ] && [ ! -e /tmp/site/.installed ]; then  # once per machine: a second gpu_run.sh beside a first one
  # must not replace the packages the first one is importing
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  touch /tmp/site/.installed
fi
mkdir -p /tmp/p/bla && for d in kernels model data train eval launch; do ln -sfn "$PWD/$d" "/tmp/p/bla/$d"; done
export PYTHONPATH=/tmp/p:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$OUT/device.txt"  # the copy's git can lag the tree it runs: note the commit here too
for stage in "$@"; do
  echo "=== $stage $(date -u +%H:%M:%S)"
  case $stage in
    cmd)  # any command ($CMD) in this environment (PYTHONPATH, wheels); e.g. one that may hang, under
      # `PYTHONFAULTHANDLER=1 timeout -s ABRT N`: at N s every thread's stack is printed
      bash -c "${CMD:?set CMD}" 2>&1 | grep -v -E "Warning|warn\(|^$" | tee -a "$OUT/cmd.txt" ;;
    flexcompile)  # issue 43: which part of FlexAttention over packed documents compiles for minutes (the packed attn
      # row never finished on an H100): the mask alone, the attention alone, both, one 350m attn block; each part cut
      # with its stacks at FLEX_LIMIT s (120); FLEX_ENV: e.g. TORCHINDUCTOR_COMPILE_THREADS=1 (no compile workers)
      env $FLEX_ENV python3 benchmarks/lab/flex_compile.py --limit "${FLEX_LIMIT:-120}" 2>&1 | tee "$OUT/flex_compile$TAG.txt" ;;
    tests)  # the GPU cases of the compile, custom-op and static-decoding tests
      python3 -m pytest -q -m "not slow" -p no:logging --tb=short tests/test_compile.py tests/test_decode.py 2>&1 | grep -E "^E |passed|failed|Error" | head -40 | tee "$OUT/tests.txt" ;;
    breaks)  # graph breaks of the compiled blocks
      python3 benchmarks/lab/compile_check.py 2>&1 | grep -v Warning | tail -20 | tee "$OUT/breaks.txt" ;;
    optim2k)  # DeepSpeed's optimizer wrappers: ZeRO-1, and ZeRO-1 with fp32 gradients (BF16_Optimizer)
      python3 benchmarks/training.py --presets 350m --seq-lens 2048 --mixers attn --set zero_stage=1 --profile --json "$OUT/train_2k_z1.json" 2>&1 | grep -v Warning | tail -17 | tee "$OUT/train_2k_optim.txt"
      python3 benchmarks/training.py --presets 350m --seq-lens 2048 --mixers attn --set zero_stage=1 deepspeed_config=benchmarks/lab/bf16_fp32_grads.json --profile --json "$OUT/train_2k_z1fp32.json" 2>&1 | grep -v Warning | tail -17 | tee -a "$OUT/train_2k_optim.txt" ;;
    plain2k)  # the model in the baseline's loop, beside the baseline and the engine (attn: RoPE shared now)
      python3 benchmarks/training.py --presets 350m --seq-lens 2048 --mixers attn bla --baseline --plain-loop --json "$OUT/train_2k_plain.json" 2>&1 | grep -v Warning | tee "$OUT/train_2k_plain.txt" ;;
    train2k)  # the stack against the plain baseline at 2k, compiled, with the top kernels of a step
      python3 benchmarks/training.py --presets 350m --seq-lens 2048 --mixers attn bla --baseline --profile --json "$OUT/train_2k.json" 2>&1 | grep -v Warning | tee "$OUT/train_2k.txt" ;;
    ab2k)  # issue 43's A/B in one run: the trainer's step, nan_policy's read where it was (before the backward), CUDA
      # graph trees over the blocks; beside the plain baseline, each row's top kernels
      python3 benchmarks/training.py --presets 350m --seq-lens 2048 --mixers attn bla --baseline --profile \
        --variants ${AB_VARIANTS:-default check_first cuda_graphs} --json "$OUT/train_2k_ab.json" 2>&1 \
        | grep -v -E "Warning|MA |CPU Virtual|_optimizer|group 0|_warn_once|warn_once|^$" | tee "$OUT/train_2k_ab.txt" ;;
    cuts2k)  # issue 43, the cuts of 2026-12-08: this torch's varlen_attn and the GPU tests of the paths through it; the
      # packed attn row through it (graphs); bla's A/B of the stacked projections and the foreach gradient hand-over
      # beside the baseline; the attn row. About 8 minutes; 5 files.
      F="Warning|MA |CPU Virtual|_optimizer|group 0|_warn_once|warn_once|^$"
      { python3 -c "import inspect, torch, torch.nn.attention.varlen as v; print(torch.__version__, inspect.signature(v.varlen_attn))"
        timeout 90 python3 -m pytest -q -p no:logging --tb=short tests/test_flex.py -k gpu 2>&1 | grep -E "^E |passed|failed|skipped|Error" | head -20
        timeout 100 python3 benchmarks/training.py --presets 350m --seq-lens 2048 --mixers attn --packed 512 --variants cuda_graphs \
          --steps 6 --json "$OUT/train_2k_packed_attn.json" 2>&1 | grep -v -E "$F" | tail -6
        timeout 280 python3 benchmarks/training.py --presets 350m --seq-lens 2048 --mixers bla --baseline --variants cuda_graphs \
          cuda_graphs_split_proj cuda_graphs_ds_grads --json "$OUT/train_2k_bla_ab.json" 2>&1 | grep -v -E "$F" | tail -10
        timeout 80 python3 benchmarks/training.py --presets 350m --seq-lens 2048 --mixers attn --variants cuda_graphs \
          --json "$OUT/train_2k_attn.json" 2>&1 | grep -v -E "$F" | tail -4; } | tee "$OUT/cuts2k.txt" ;;
    packed2k)  # issue 43: the LM path (packed documents, mean 512 tokens; cu_seqlens padded to a power of two) with
      # and without CUDA graph trees: tokens/s, and the loss after the same updates (the graphs must not change it)
      python3 benchmarks/training.py --presets 350m --seq-lens 2048 --mixers bla attn --packed 512 \
        --variants default cuda_graphs --json "$OUT/train_2k_packed.json" 2>&1 \
        | grep -v -E "Warning|MA |CPU Virtual|_optimizer|group 0|_warn_once|warn_once|^$" | tee "$OUT/train_2k_packed.txt" ;;
    scale)  # issue 43's other sizes: 125m at 2k against its plain baseline (the most host-bound), with and without CUDA
      # graph trees; 1.3b at 2k and 8k (MFU of spec section 3's FLOPs), bla and attn
      python3 benchmarks/training.py --presets 125m --seq-lens 2048 --mixers attn bla --baseline --variants default cuda_graphs \
        --json "$OUT/train_125m.json" 2>&1 | grep -v -E "Warning|MA |CPU Virtual|_optimizer|group 0|_warn_once|warn_once|^$" | tee "$OUT/train_125m.txt"
      python3 benchmarks/training.py --presets 1.3b --seq-lens 2048 8192 --mixers attn bla --json "$OUT/train_1.3b.json" 2>&1 \
        | grep -v -E "Warning|MA |CPU Virtual|_optimizer|group 0|_warn_once|warn_once|^$" | tee "$OUT/train_1.3b.txt" ;;
    eager2k)  # the same rows eager (compile=false): the compiled path's gain
      python3 benchmarks/training.py --presets 350m --seq-lens 2048 --mixers attn bla --set compile=false --json "$OUT/train_2k_eager.json" 2>&1 | grep -v Warning | tee "$OUT/train_2k_eager.txt" ;;
    sac2k)  # activation checkpointing's trade-off
      for ac in ops block; do python3 benchmarks/training.py --presets 350m --seq-lens 2048 --mixers bla attn --set activation_checkpointing=$ac --json "$OUT/train_2k_$ac.json" 2>&1 | grep -v -E "Warning|MA |CPU Virtual|_optimizer|group 0" | tee -a "$OUT/train_2k_ac.txt"; done ;;
    train16k)
      python3 benchmarks/training.py --presets 350m --seq-lens 16384 --mixers attn bla --baseline --variants cuda_graphs default --json "$OUT/train_16k.json" 2>&1 \
        | grep -v -E "Warning|MA |CPU Virtual|_optimizer|group 0|_warn_once|warn_once|^$" | tee "$OUT/train_16k.txt" ;;
    bla16k)
      python3 benchmarks/training.py --presets 350m --seq-lens 16384 --mixers bla --json "$OUT/train_16k_bla.json" 2>&1 | grep -v -E "Warning|MA |CPU Virtual|_optimizer|group 0" | tee "$OUT/train_16k_bla.txt" ;;
    generate)  # inference against context, BLA beside softmax attention, one run
      python3 -m bla.eval.memory --preset 125m --mixers bla attn --contexts 1024 8192 32768 131072 --batches 1 8 64 \
        --json "$OUT/generate.json" --png "$OUT/generate.png" 2>&1 | grep -v Warning | tee "$OUT/generate.txt" ;;
    bla2k)  # the BLA row alone (after a host-side change), with its profile
      python3 benchmarks/training.py --presets 350m --seq-lens 2048 --mixers bla --profile --json "$OUT/train_2k_bla.json" 2>&1 | grep -v -E "Warning|MA |CPU Virtual|_optimizer|group 0" | tee "$OUT/train_2k_bla.txt" ;;
    curve)  # compiled against eager training: the same loss curve (125m-shaped BLA on MQAR, 600 steps)
      for c in true false; do
        python3 -m bla.train.cli mqar model.preset=125m model.vocab_size=8192 steps=600 eval_every=200 save_every=600 \
          log_every=10 compile=$c progress=false out_dir=/tmp/curve_$c cache_dir=/tmp/cache 2>&1 | grep -E "first step|step 600|finished" | tee -a "$OUT/curve.txt"
        cp /tmp/curve_$c/summary.json "$OUT/curve_$c.json"
      done ;;
    graphs)  # issue 43: training with cuda_graphs=true against false (the blocks compiled either way): the same
      # losses? a 125m-shaped BLA on MQAR, GRAPH_STEPS steps each; GRAPH_RUN=main: the main job's LM on packed documents
      # (the second run finds the first's compile caches warm: its first step is no measure of capture's cost)
      for g in false true; do
        python3 -m bla.train.cli ${GRAPH_RUN:-mqar model.preset=125m model.vocab_size=8192} steps=${GRAPH_STEPS:-200} eval_every=100 \
          save_every=1000 log_every=10 cuda_graphs=$g progress=false out_dir=/tmp/graphs_$g cache_dir=/tmp/cache 2>&1 \
          | grep -E "first step|step [0-9]+:|finished|Error|error" | sed "s/^/cuda_graphs=$g /" | tee -a "$OUT/graphs.txt"
        cp /tmp/graphs_$g/summary.json "$OUT/graphs_$g.json"
      done
      python3 -c "
import json
a, b = (json.load(open(f'$OUT/graphs_{g}.json')) for g in ('false', 'true'))
la, lb = ([h['loss'] for h in x['losses']] for x in (a, b))
same = sum(x == y for x, y in zip(la, lb))
print(f'{same} of {len(la)} logged step losses identical; largest difference {max(abs(x - y) for x, y in zip(la, lb)):.3g}')
print('val_loss', a.get('val_loss'), b.get('val_loss'))" 2>&1 | tee -a "$OUT/graphs.txt" ;;
    isolation)  # the GPU tests of the day's changes: the whole model keeps every token in its document and its future
      # (Triton kernels eager, compiled and replayed as CUDA graphs, bf16, packed rows with padded cu_seqlens; attn through
      # FlexAttention when compiled), cached tables outside CUDA graph pools, FlexAttention's gradients against SDPA's
      timeout "${ISOLATION_LIMIT:-240}" python3 -m pytest -v -p no:logging --tb=short tests/test_isolation.py tests/test_device_cache.py \
        tests/test_flex.py -m gpu 2>&1 \
        | grep --line-buffered -E "^E |PASSED|FAILED|SKIPPED|ERROR|passed|failed|Error" | grep -v -E "Data Pointer|^E +$" | head -60 \
        | tee "$OUT/isolation.txt" ;;  # (a pool leak lists every tensor's pointer: the reason is kept, the list dropped)
    graphsdebug)  # issue 43: where the tensors cuda_graphs=true leaks into the graph pool were allocated (Inductor's
      # history recording): the trainer on MQAR (125m), then the packed 350m BLA row; each log whole, and its bla frames counted
      timeout 200 python3 benchmarks/lab/graphs_debug.py -m bla.train.cli mqar model.preset=125m model.vocab_size=8192 steps=12 \
        optim.warmup_steps=2 eval_every=12 save_every=12 log_every=4 cuda_graphs=true progress=false out_dir=/tmp/graphsdebug \
        cache_dir=/tmp/cache > "$OUT/graphsdebug_trainer.txt" 2>&1
      timeout 200 python3 benchmarks/lab/graphs_debug.py benchmarks/training.py --presets 350m --seq-lens 2048 --mixers bla \
        --packed 512 --variants cuda_graphs --steps 2 > "$OUT/graphsdebug_packed.txt" 2>&1
      for f in "$OUT"/graphsdebug_*.txt; do echo "== $f"; grep -E "finished|tok/s|Detected|^RuntimeError" "$f" | head -3
        grep -E 'File "/tmp/p/bla|File "/tmp/site/deepspeed' "$f" | sort | uniq -c | sort -rn | head -20; done ;;
    regress)  # issue 44: plain BLA m = 64 at the Zoology-faithful MQAR point recalled 0.42 on 2026-12-02 (0fbd70a, H200; 3 seeds
      # 0.41-0.43) and 0.002 on 12-07 (3b898fa, H100, seed 0): the same run at both commits in one call (`git archive 0fbd70a
      # kernels model data train eval launch` unpacked as gpu_old0/bla, carried), and at HEAD without compile (blocks and
      # loss eager), with the torch backend, on seeds 1 and 2, and SWA W = 64 at HEAD (a change outside BLA's path would move
      # it too); all at once, one line each
      mkdir -p /tmp/o0 && ln -sfn "$PWD/gpu_old0/bla" /tmp/o0/bla
      A="mqar steps=${REGRESS_STEPS:-3000} eval_every=500 save_every=5000 eval_batches=4 deterministic=true model.bla.gates=dirichlet
         model.bla.window=256 model.bla.slots=64 optim.lr=4.6e-4 progress=false"
      set -f  # the overrides' brackets are not globs
      # (REGRESS_RUNS: a subset; REGRESS_STEPS: shorter runs, whose loss still tells: on 12-02 m = 64 left the plateau near step 1000)
      for run in ${REGRESS_RUNS:-old:seed=0 new:seed=0 new:compile=false new:model.bla.backend=torch new:seed=1 new:seed=2 old:seed=1 \
                 new:model.layer_pattern=[swa]+model.swa_window=64+optim.lr=2.2e-3}; do  # SWA W = 64: 0.597 on 12-02, seed 0
        tree=${run%%:*}; set=${run#*:}; set=${set//+/ }; name=$(echo "$run" | tr ':=.+[]' '______' | cut -c1-60)
        PYTHONPATH=$([ "$tree" = old ] && echo /tmp/o0 || echo /tmp/p):/tmp/site timeout "${REGRESS_LIMIT:-520}" \
          python3 -m bla.train.cli $A $set cache_dir=/tmp/cache_$tree out_dir=/tmp/regress_$name > "/tmp/regress_$name.log" 2>&1 &
      done
      set +f
      for tree in /tmp/o0 /tmp/p; do  # meanwhile the kernels alone at the training batch: errors against float64, each tree
        # (beside five trainings its Triton compilation took over 100 s on an H100: at 100 s it prints where it is and exits)
        DUMP_AFTER_S=100 PYTHONPATH=$tree:/tmp/site python3 benchmarks/lab/kernel_bf16_error.py 64 > "/tmp/kernels_$(basename $tree).txt" 2>&1
        echo "kernels of $tree: $(grep -v Warn "/tmp/kernels_$(basename $tree).txt" | head -60)"
      done | tee "$OUT/regress_kernels.txt"
      wait
      for f in /tmp/regress_*.log; do  # a run cut by the limit still tells its last evaluation and loss
        echo "$f: $(grep -E "finished|Error" "$f" | tail -1) | $(grep -E "train loss" "$f" | tail -1) | $(grep -E "] step [0-9]+/" "$f" | tail -1 | cut -c1-80)"
      done | tee "$OUT/regress.txt"
      # the summaries in one file: the device tool returns at most 8 files a call, and this stage runs beside others
      # (on 2026-12-07 beside `sweep`, one file per run crowded out the sweep's two)
      mkdir -p /tmp/regress_json && for d in /tmp/regress_*/; do [ -f "$d/summary.json" ] && cp "$d/summary.json" "/tmp/regress_json/$(basename "$d").json"; done
      tar czf "$OUT/regress.tgz" -C /tmp/regress_json . ;;
    gated)  # issue 44: BLA with all three extensions (the torch backend), 20 steps compiled with CUDA_LAUNCH_BLOCKING=1 (a
      # fault where it happens), without compile, and without deterministic=true, at once (before d78eb09 the compiled runs
      # faulted: misaligned parameters in DeepSpeed's flat buffer)
      A="mqar steps=20 eval_every=20 save_every=20 log_every=5 optim.warmup_steps=2 eval_batches=2 deterministic=true model.bla.gates=dirichlet
         model.bla.window=256 model.bla.slots=16 model.bla.write_gate=true model.bla.forget_gate=true model.bla.phase_shift=staggered progress=false"
      for run in blocking:CUDA_LAUNCH_BLOCKING=1 eager:compile=false nondet:deterministic=false; do
        name=${run%%:*}; set=${run#*:}
        if [ "$name" = blocking ]; then env $set timeout 200 python3 -m bla.train.cli $A cache_dir=/tmp/cache out_dir=/tmp/gated_$name > "$OUT/gated_$name.txt" 2>&1 &
        else timeout 200 python3 -m bla.train.cli $A $set cache_dir=/tmp/cache out_dir=/tmp/gated_$name > "$OUT/gated_$name.txt" 2>&1 & fi
      done
      wait
      for f in "$OUT"/gated_*.txt; do echo "== $f"; grep -E "finished|Error|error|File \"/tmp/p/bla" "$f" | grep -v Warn | tail -8 | cut -c1-300; done ;;
    curve350m)  # issues 18 and 43's show: the 350m preset, 2,000 steps of 8k tokens on the embedded corpus, eager
      # and compiled (with CUDA graphs unless CURVE_GRAPHS=false) at once on the one GPU (the eager run starts first; the
      # compiled one once the eager run's first step shows the data cache is built); logs land in $OUT as they come
      for c in false true; do
        python3 -m bla.train.cli main model.preset=350m model.vocab_size=4096 data.seq_len=2048 micro_batch=4 steps=2000 \
          optim.lr=1e-3 optim.warmup_steps=100 eval_every=500 save_every=2000 log_every=10 compile=$c progress=false \
          $([ $c = true ] && echo "cuda_graphs=${CURVE_GRAPHS:-true}") \
          out_dir=/tmp/curve350m_$c cache_dir=/tmp/cache 2>&1 | grep --line-buffered -E "first step|step [0-9]+:|finished|Error|error" > "$OUT/curve350m_$c.txt" &
        while [ "$c" = false ] && ! grep -q "first step" "$OUT/curve350m_false.txt" 2>/dev/null; do sleep 2; done
      done
      wait
      for c in false true; do cp /tmp/curve350m_$c/summary.json "$OUT/curve350m_$c.json"; done ;;
    hostprofile)  # where the host's time goes in one eager forward+backward (torch profiler's CPU ops, cProfile)
      python3 benchmarks/lab/host_profile.py 2>&1 | grep -v Warn | tee "$OUT/host_profile$TAG.txt" ;;
    hostparts)  # the host time of each part of a BLA call
      python3 benchmarks/lab/host_parts.py 2>&1 | grep -v Warn | tee "$OUT/host_parts.txt" ;;
    variants)  # issue 17's kernel variants (sub-chunk sizes, pair forms, warps; VARIANTS=scan: the scan's rows; VARIANTS=scan_group: the two-level segment scan at B=1, T=128k; VARIANTS=tile_run: how m=128's slot tiles run; VARIANTS=warps128: 8 warps in some kernels at m=128; VARIANTS=factor_el: e^l as its own tile or from A) beside flex SWA, one process
      # VARIANT_ARGS: more options, e.g. "--shape 1 32768 --dtype float32"; TAG names the files apart
      python3 benchmarks/lab/kernel_variants.py --set "${VARIANTS:-all}" $VARIANT_ARGS --json "$OUT/kernel_variants$TAG.json" 2>&1 | grep --line-buffered -v Warning | tee "$OUT/kernel_variants$TAG.txt" ;;
    triton)  # a few Triton kernel tests on the GPU (each case compiles its own kernels, 10-60 s: at
      # 030793b the halves/half_inputs/without_initial selection ran past 390 s unfinished; bounded here).
      # TRITON_K picks others (pytest -k), TRITON_LIMIT bounds them (240 s)
      timeout "${TRITON_LIMIT:-240}" python3 -m pytest -v -p no:logging --tb=short tests/test_triton.py -k "${TRITON_K:-long_window or half_inputs}" 2>&1 | grep --line-buffered -E "^E |PASSED|FAILED|SKIPPED|ERROR|passed|failed|Error" | head -80 | tee "$OUT/triton_tests$TAG.txt" ;;
    gates)  # issue 17's benchmark at its shape for each gate rule (the model trains with fejer, the operator defaults to dirichlet)
      for gates in dirichlet fejer; do
        python3 benchmarks/kernel.py gpu --head-dims 64 --slots 64 --seq-lens 8192 --tokens 32768 --window 512 4096 --gates $gates \
          --json "$OUT/kernel_gates_$gates.json" 2>&1 | grep --line-buffered -v Warning | tee "$OUT/kernel_gates_$gates.txt"
      done ;;
    fla)  # issue 17's benchmark with fla's chunk_gsa beside it (its wheels, fla-core and einops, in .whl-fla:
      # carry it too). fla autotunes 19 kernels at its first call (343 s on an H200, so the shapes are few); its
      # choices persist (Triton's cache_results) in $OUT/fla_tune.tgz even when the stage is cut: unpack that into
      # .fla-tune (git-ignored) and carry it, and the next call starts tuned. FLA_LIMIT bounds the benchmark (420 s).
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-fla .whl-fla/*.whl || exit 1
      export TRITON_CACHE_DIR=/tmp/triton-fla; mkdir -p "$TRITON_CACHE_DIR"
      [ -d .fla-tune ] && cp -r .fla-tune/. "$TRITON_CACHE_DIR/"
      PYTHONPATH=$PYTHONPATH:/tmp/site-fla TRITON_PRINT_AUTOTUNING=1 timeout "${FLA_LIMIT:-420}" python3 benchmarks/kernel.py gpu \
        --head-dims 64 --slots 64 --seq-lens 8192 --tokens 32768 --window 512 4096 --json "$OUT/kernel_fla.json" 2>&1 \
        | grep -v Warning | tee "$OUT/kernel_fla.txt"
      (cd "$TRITON_CACHE_DIR" && find . -name "*.autotune.json" | tar czf "$OUT/fla_tune.tgz" -T -)
      unset TRITON_CACHE_DIR ;;
    accuracy)  # issue 17: the bf16 kernel against the fp32 torch backend at W=4096 (one centre over 64 tokens since 63bc74b; halves before)
      timeout 150 python3 benchmarks/kernel.py accuracy --head-dims 64 128 --slots 64 --window 4096 --all-gates dirichlet fejer \
        --json "$OUT/accuracy_4096.json" 2>&1 | grep -v Warning | tee "$OUT/accuracy_4096.txt" ;;
    accuracy128)  # issue 17: m = 128's slot tiles (one launch each, the default, then one program each) against the fp32 torch backend
      for run in launches grid; do BLA_TRITON_TUNE=tile_run=$run timeout 170 python3 benchmarks/kernel.py accuracy --head-dims 64 --slots 128 \
        --window 512 4096 --all-gates dirichlet fejer --json "$OUT/accuracy_m128_$run.json" 2>&1 | grep -v Warning | tee "$OUT/accuracy_m128_$run.txt"; done ;;
    sweep)  # issue 19: the sweep $SWEEP, $SWEEP_JOBS runs at a time, no run started after $SWEEP_START_BY s (started
      # runs finish), all cut after $SWEEP_LIMIT s (a run cut mid-way is lost: its checkpoint stays on the machine). Finished runs come back in ONE file, $OUT/sweep_$SWEEP.tgz (the
      # device tool returns only a few files per call): every run's result.json, summary.json, sweep_run.json and
      # train.log, and the report. To resume in a later call, unpack it into experiments/results/$SWEEP and carry
      # experiments/results/$SWEEP/runs (runs/ is git-ignored, so it travels only when carried): finished runs are not re-run.
      # (16 jobs trained 16 runs of mqar_ablations in about 5 minutes on an H200.)
      name=${SWEEP:?set SWEEP to a sweep name}; dir=/tmp/sweeps/$name; mkdir -p "$dir/runs"
      spec=$name; [ -f "experiments/sweeps/$name.yaml" ] && spec="experiments/sweeps/$name.yaml"  # an experiment: by path
      if [ -d "experiments/results/$name/runs" ]; then cp -r "experiments/results/$name/runs/." "$dir/runs/"; fi
      timeout "${SWEEP_LIMIT:-540}" python3 -m bla.launch.cli sweep "$spec" --out "$dir" --jobs "${SWEEP_JOBS:-16}" --cache-dir /tmp/cache \
        --start-by "${SWEEP_START_BY:-250}" \
        2>&1 | grep -v -E "Warning|Processing zero|Parsing checkpoint|Loading checkpoint" | tee "$OUT/sweep_$name.txt"
      python3 -m bla.launch.cli sweep "$spec" --out "$dir" --report 2>&1 | grep -v Warning | tail -40 | tee -a "$OUT/sweep_$name.txt"
      (cd "$dir" && find runs -maxdepth 2 \( -name result.json -o -name summary.json -o -name sweep_run.json -o -name train.log \) \
        -exec sh -c 'test -e "$(dirname "$1")/result.json"' _ {} \; -print | tar czf "$OUT/sweep_$name.tgz" -T - \
        $(ls ./*.csv ./*.json ./*.png ./spec.yaml 2>/dev/null)) ;;
    repeat)  # issue 19: does deterministic=true make a BLA run repeat itself on the GPU? The same short MQAR run (bla
      # m=16, W=128, compiled, bf16) twice in separate processes, one with another job loading the GPU, then the losses.
      # REPEAT_SET: more overrides for both runs, to bisect the source (at b7dbc13 deterministic=true runs parted at
      # step 8): e.g. REPEAT_SET="compile=false", "model.bla.backend=torch", "precision=fp32"
      rm -rf /tmp/repeat_1 /tmp/repeat_2 /tmp/repeat_load  # a finished out_dir would be resumed, not retrained
      for i in 1 2; do
        [ "$i" = 2 ] && { python3 -m bla.train.cli mqar out_dir=/tmp/repeat_load cache_dir=/tmp/cache steps=400 optim.warmup_steps=10 \
          data.seq_len=128 data.mqar.num_kv_pairs=16 data.mqar.vocab_size=256 model.vocab_size=256 model.bla.window=128 progress=false >/dev/null 2>&1 & }
        python3 -m bla.train.cli mqar out_dir=/tmp/repeat_$i cache_dir=/tmp/cache steps=200 eval_every=200 save_every=200 log_every=1 \
          optim.warmup_steps=10 data.seq_len=128 data.mqar.num_kv_pairs=16 data.mqar.vocab_size=256 model.vocab_size=256 \
          model.bla.slots=16 model.bla.window=128 optim.lr=3e-3 deterministic=${DETERMINISTIC:-true} progress=false $REPEAT_SET 2>&1 \
          | grep -E "Error|error|deterministic" | sort -u | head -8 | tee -a "$OUT/repeat_log.txt"  # an op without a deterministic form warns
      done
      wait
      python3 -c "
import json
a, b = (json.load(open(f'/tmp/repeat_{i}/summary.json'))['losses'] for i in (1, 2))
same = [x['loss'] == y['loss'] for x, y in zip(a, b)]
first = same.index(False) + 1 if False in same else None
print(f'deterministic=${DETERMINISTIC:-true} ${REPEAT_SET}: {sum(same)} of {len(same)} step losses identical; first difference at step {first}')
print('step 1:', a[0]['loss'], b[0]['loss'], ' step 200:', a[-1]['loss'], b[-1]['loss'])" 2>&1 | tee -a "$OUT/repeat.txt" ;;
    determinism)  # issue 19: the same computation twice in one process, bit for bit; --poison: new tensors start as NaN
      # (as under deterministic=true); --load: another process keeps the GPU busy
      python3 benchmarks/lab/determinism.py --repeats 10 --poison --json "$OUT/determinism_poison.json" 2>&1 | grep -v Warn | tee "$OUT/determinism.txt"
      python3 benchmarks/lab/determinism.py --repeats 10 --load --json "$OUT/determinism_load.json" 2>&1 | grep -v Warn | tee -a "$OUT/determinism.txt" ;;
    regbench_nan)  # issue 19: regbench_v2's BLA runs went non-finite at step 2 (deterministic=true): 6 steps of one,
      # deterministic and not, compiled and eager, side by side
      for det in true false; do for c in true false; do
        python3 -m bla.train.cli regbench out_dir=/tmp/rbnan_${det}_$c cache_dir=/tmp/cache steps=6 eval_every=6 save_every=6 log_every=1 \
          data.seq_len=256 model.bla.slots=16 optim.lr=1e-3 optim.warmup_steps=2 deterministic=$det compile=$c progress=false 2>&1 \
          | grep -E "step [0-9]+:|first step|non-finite|Error" | head -12 | sed "s/^/det=$det compile=$c /" > "$OUT/rbnan_${det}_$c.txt" &
      done; done; wait
      for f in /tmp/rbnan_*/summary.json; do python3 -c "import json,sys; print(sys.argv[1], [round(h['loss'], 4) for h in json.load(open(sys.argv[1]))['losses']])" "$f"; done > "$OUT/rbnan_losses.txt"
      cat "$OUT"/rbnan_*.txt | tee "$OUT/regbench_nan.txt" ;;
    profile)  # issue 17: per-kernel CUDA times, registers and spills at m = 64 and 128 (W = 512)
      for m in 64 128; do python3 benchmarks/lab/kernel_profile.py 512 $m 2>&1 | grep -v Warning | tee -a "$OUT/kernel_profile.txt"; done ;;
    ncu)  # issue 17: what bounds each kernel (Nsight Compute's speed-of-light and occupancy), m = 64, W = 512
      # and 4096, clocks left free as in the timings (ncu reads no counters under gVisor: the log says so)
      for W in 512 4096; do NCU=1 timeout 200 ncu --clock-control none --section SpeedOfLight --section Occupancy \
        --section LaunchStats -k regex:"_kernel" python3 benchmarks/lab/kernel_profile.py $W 64 2>&1 | grep -v Warning | tee -a "$OUT/ncu_$W.txt"; done ;;
    firstcall)  # issue 17: the first call at a new shape (empty Triton cache, tables built) at W = 4096, m = 64 and 128
      for m in 64 128; do python3 benchmarks/kernel.py gpu --head-dims 64 --slots $m --seq-lens 8192 --tokens 32768 --window 4096 \
        --no-flex --first-call --json "$OUT/first_call_m$m.json" 2>&1 | grep -v Warning | tee -a "$OUT/first_call.txt"; done ;;
    throughput)  # issue 17's show: 350m training throughput with BLA beside softmax attention, one run
      python3 benchmarks/training.py --presets 350m --seq-lens 2048 --mixers bla attn --json "$OUT/train_2k_throughput.json" 2>&1 \
        | grep -v -E "Warning|MA |CPU Virtual|_optimizer|group 0" | tee "$OUT/train_2k_throughput.txt" ;;
    split)  # issue 42: the kernels split by stage beside the pre-split ones (`git archive bcbdc87 kernels` unpacked
      # as gpu_old/bla/kernels, carried), alternating o1 p1 o2 p2 (SPLIT_RUNS) in one call; one log and one tarball of the JSON
      mkdir -p /tmp/o/bla && ln -sfn "$PWD/gpu_old/bla/kernels" /tmp/o/bla/kernels
      for run in ${SPLIT_RUNS:-o1 p1 o2 p2}; do
        echo "--- $run ($([ ${run:0:1} = o ] && echo pre-split bcbdc87 || echo split))" | tee -a "$OUT/kernel_split.txt"
        PYTHONPATH=/tmp/${run:0:1}:/tmp/site python3 benchmarks/kernel.py gpu --head-dims 64 --slots 64 --seq-lens 8192 --tokens 32768 \
          --window 512 4096 --json "/tmp/kernel_split_$run.json" 2>&1 | grep -v Warning | tee -a "$OUT/kernel_split.txt"
      done
      (cd /tmp && tar czf "$OUT/kernel_split.tgz" kernel_split_*.json) ;;
    kernel)  # issue 17's benchmark at the anchor shape
      python3 benchmarks/kernel.py gpu --head-dims 64 --slots 64 128 --seq-lens 8192 --tokens 32768 --window 512 4096 \
        --json "$OUT/kernel.json" 2>&1 | grep -v Warning | tee "$OUT/kernel.txt" ;;
  esac
done
