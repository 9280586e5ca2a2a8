"""Two training runs' loss curves on one plot, and how far apart they are (used for benchmarks/reports/2026-11-to-12.md).

    python benchmarks/lab/plot_curves.py A.json B.json --labels compiled eager --png out.png

Each JSON is a run's summary.json (its ``losses``: one {step, loss} per step). Prints the mean
absolute difference of the step losses, of their 50-step means, and the final val_loss of each.
"""

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def losses(path):
    summary = json.load(open(path))
    return [x["step"] for x in summary["losses"]], [x["loss"] for x in summary["losses"]], summary.get("val_loss")


def smooth(xs, n=50):
    return [sum(xs[i : i + n]) / len(xs[i : i + n]) for i in range(0, len(xs), n)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs=2)
    ap.add_argument("--labels", nargs=2, default=["a", "b"])
    ap.add_argument("--title", default="")
    ap.add_argument("--png", required=True)
    args = ap.parse_args()
    (sa, la, va), (sb, lb, vb) = (losses(p) for p in args.runs)
    if sa != sb:
        raise SystemExit(f"the runs log different steps ({len(sa)} and {len(sb)})")
    step_diff = sum(abs(a - b) for a, b in zip(la, lb)) / len(la)
    mean_diff = sum(abs(a - b) for a, b in zip(smooth(la), smooth(lb))) / len(smooth(la))
    print(f"{len(sa)} steps: mean |diff| of step losses {step_diff:.4f}, of 50-step means {mean_diff:.4f}; "
          f"val_loss {args.labels[0]} {va:.4f}, {args.labels[1]} {vb:.4f}")  # fmt: skip
    fig, ax = plt.subplots(figsize=(7, 4))
    for (steps, ls, label), colour, dash in zip(((sa, la, args.labels[0]), (sb, lb, args.labels[1])), ("C0", "C3"), ("-", "--")):
        ax.plot(steps, ls, lw=0.4, alpha=0.3, color=colour)
        ax.plot(steps[24::50][: len(smooth(ls))], smooth(ls)[: len(steps[24::50])], dash, lw=1.5, color=colour,
                label=f"{label} (50-step mean)")  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title(args.title or f"mean |diff| {step_diff:.4f} per step, {mean_diff:.4f} over 50-step means")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)


if __name__ == "__main__":
    main()
