"""Run a module or script with Inductor's CUDA-graph-tree history recording on, so that a
"tensor(s) in the cudagraph pool not tracked as outputs" error names where each leaked tensor
was allocated (issue 43: cuda_graphs=true failed in the trainer and on packed BLA rows).
    python benchmarks/lab/graphs_debug.py -m bla.train.cli mqar compile=true cuda_graphs=true ...
    python benchmarks/lab/graphs_debug.py benchmarks/training.py --presets 350m ...
"""

import runpy
import sys

import torch._inductor.config as inductor_config

inductor_config.triton.cudagraph_trees_history_recording = True

if sys.argv[1] == "-m":
    module, sys.argv = sys.argv[2], [sys.argv[2], *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
else:
    sys.argv = sys.argv[1:]
    sys.path.insert(0, sys.argv[0].rsplit("/", 1)[0])
    runpy.run_path(sys.argv[0], run_name="__main__")
