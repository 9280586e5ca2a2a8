#!/usr/bin/env bash
# bla-lm on a fresh machine: sets up its environment once, then runs what you ask.
#
#   ./run.sh train [ARGS]    the main job: pretrain a small BLA LM on the embedded corpus (`bla train`)
#   ./run.sh test            the test suite (what CI runs)
#   ./run.sh bla ARGS...     any `bla` command inside the environment
#
# The environment is .venv (override with BLA_VENV), made with --system-site-packages so a
# torch you installed first (a CUDA build on a GPU machine) is kept; without one, the CPU
# build torch==2.13.0 is installed.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${BLA_VENV:-.venv}"
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
    echo "[run.sh] creating $VENV" >&2
    python3 -m venv --system-site-packages "$VENV"
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "[run.sh] no torch found: installing the CPU build torch==2.13.0" >&2
    "$PY" -m pip install -q torch==2.13.0
fi
stamp="$VENV/.bla-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[run.sh] installing bla-lm and its test dependencies into $VENV" >&2
    # DeepSpeed ships as an sdist whose setup imports torch: build it against the torch above
    # (an isolated build would download another, multi-GB, torch).
    "$PY" -m pip install -q --no-build-isolation "deepspeed>=0.16,<0.20"
    "$PY" -m pip install -q -e ".[test]"
    echo "$want" > "$stamp"
fi

cmd="${1:-test}"
shift || true
case "$cmd" in
    # two workers, each test file on one of them (files share their module fixtures): most tests
    # spawn a process or two and leave a core idle; files start longest first (tests/conftest.py);
    # BLA_TEST_WORKERS=0 runs them in this process
    test) exec "$PY" -m pytest -q -ra --durations=10 -n "${BLA_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@" ;;
    train) exec "$VENV/bin/bla" train "$@" ;;
    bla) exec "$VENV/bin/bla" "$@" ;;
    *) echo "usage: ./run.sh train [ARGS] | ./run.sh test | ./run.sh bla ARGS..." >&2; exit 2 ;;
esac
