"""How many MQAR pairs BLA's slots hold apart, from the gates alone (no training): issue 19's
slot-allocation geometry, measured.

BLA's writes and decays depend only on positions, so the weight of token u in slot j after
token t is a fixed number, ``S_t[j, u] = s_u,j prod_{u < i <= t} alpha_i,j`` (signed: the
Dirichlet write has negative side lobes). Model of the readout: a query for pair i, after token t,
reads the slot that holds the most of that pair, j* = argmax_j S_t[j, p_i] (p_i: the position of
pair i's value token, which sees its key through the short convolution; the softmax over slots
goes there when the query matches its key), and gets sum_i' S_t[j*, p_i'] v_i'. Over the queries
of sampled MQAR examples this counts:

- ``majority``: the share of queries whose pair outweighs all other pairs together in j*
  (S_t[j*, p_i] > sum of |S_t[j*, p_i']|): the answer is then the output's dominant value;
- ``plurality``: the share whose pair has the largest weight in j* (the output's largest value
  logit, for orthonormal value embeddings: negative weights only lower a logit);

for BLA at each m (and gates rule, pair placement), beside sliding-window attention, where a pair
is read exactly when its value token is inside the window. Assumptions: one layer (a second
layer can read what the first relayed forward, so 2-layer models can beat these shares: SWA
does), the projections write only the pairs (filler tokens write nothing), keys are told apart,
and one slot is read (a mixture of slots can cancel side lobes). Run:

    python -m bla.eval.slot_capacity --window 128 --slots 4 8 16 32 64 --swa 16 32 64 128 --png capacity.png
"""

from __future__ import annotations

import argparse
import json

import torch

from bla.data.synthetic import MQARConfig, mqar_examples
from bla.data.task import IGNORE
from bla.kernels.gates import DEFAULT_GATES, GATES, dirichlet_gates


def slot_weights(seq_len: int, window: int, slots: int, gates: str = DEFAULT_GATES) -> torch.Tensor:
    """float64 [T, m, T]: the weight of token u in slot j after token t (zero for u > t)."""
    s, alpha, _ = dirichlet_gates(torch.arange(seq_len), torch.tensor([window]), slots, gates=gates)
    s, alpha = s[:, 0].double(), alpha[:, 0].double()  # [T, m]
    state = torch.zeros(slots, seq_len, dtype=torch.float64)
    out = torch.empty(seq_len, slots, seq_len, dtype=torch.float64)
    for t in range(seq_len):
        state = alpha[t][:, None] * state
        state[:, t] += s[t]
        out[t] = state
    return out


def _queries(seq_len: int, cfg: MQARConfig, examples: int, seed: int):
    """(t, value positions of the example's K pairs [K], index of the queried pair) per query."""
    inputs, labels = mqar_examples(examples, seq_len, cfg, seed)
    for x, y in zip(inputs, labels):
        # the pairs: the first occurrence of each queried key (the queries repeat the keys later);
        # every key is queried once, so these are all K pairs
        query_times = torch.nonzero(y != IGNORE).flatten().tolist()
        first_at = {}
        for u in range(seq_len):
            first_at.setdefault(int(x[u]), u)
        pairs = torch.tensor(sorted(first_at[int(x[t])] + 1 for t in query_times))
        for t in query_times:
            yield t, pairs, int(torch.searchsorted(pairs, first_at[int(x[t])] + 1))


def bla_capacity(weights: torch.Tensor, queries) -> dict:
    """The majority and plurality shares over ``queries`` for slot weights [T, m, T]."""
    majority = plurality = n = 0
    for t, pairs, i in queries:
        held = weights[t][:, pairs]  # [m, K]: each slot's weight on each pair
        read = held[int(held[:, i].argmax())]  # the slot that holds the most of pair i
        target, others = read[i], torch.cat([read[:i], read[i + 1 :]])
        majority += bool(target > others.abs().sum())
        plurality += bool(target > (others.max() if others.numel() else 0.0))
        n += 1
    return {"majority": majority / n, "plurality": plurality / n, "queries": n}


def swa_capacity(window: int, queries) -> float:
    """The share of queries whose pair's value token is inside a sliding window of ``window``."""
    inside = [t - int(pairs[i]) < window for t, pairs, i in queries]
    return sum(inside) / len(inside)


def capacity_table(seq_len: int, num_pairs: int, window: int, slots: list[int], swa: list[int], gates: list[str],
                   placements: list[str], examples: int = 200, seed: int = 0) -> list[dict]:  # fmt: skip
    rows = []
    for placement in placements:
        cfg = MQARConfig(num_kv_pairs=num_pairs, vocab_size=max(2 * seq_len, 4 * num_pairs), placement=placement)
        queries = list(_queries(seq_len, cfg, examples, seed))
        for g in gates:
            for m in slots:
                stats = bla_capacity(slot_weights(seq_len, window, m, g), queries)
                rows.append({"mixer": "bla", "gates": g, "placement": placement, "window": window, "slots": m,
                             "state": 2 * m, **stats})  # fmt: skip
        for w in swa:
            share = swa_capacity(w, queries)
            rows.append({"mixer": "swa", "placement": placement, "window": w, "state": 2 * w, "majority": share,
                         "plurality": share, "queries": len(queries)})  # fmt: skip
    return rows


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    keys = sorted({(r["mixer"], r.get("gates", ""), r["placement"]) for r in rows})
    for ax, metric, title in zip(axes, ("plurality", "majority"), ("pair has the largest weight in its slot",
                                                                     "pair outweighs all others together")):  # fmt: skip
        for mixer, g, placement in keys:
            sel = [r for r in rows if (r["mixer"], r.get("gates", ""), r["placement"]) == (mixer, g, placement)]
            label = f"{mixer}{' ' + g if g else ''}, pairs {placement}"
            ax.plot([r["state"] for r in sel], [r[metric] for r in sel], "o-" if mixer == "bla" else "s--", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("state rows per head (2m for BLA, 2W for SWA)")
        ax.set_title(f"{metric}: {title}", fontsize=9)
        ax.set_ylim(0, 1.02)
    axes[0].set_ylabel("share of MQAR queries (one layer)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--slots", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--swa", type=int, nargs="*", default=[16, 32, 64, 128])
    ap.add_argument("--gates", nargs="+", default=list(GATES), choices=GATES)
    ap.add_argument("--placements", nargs="+", default=["start", "spread"], choices=["start", "spread"])
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--json")
    ap.add_argument("--png")
    args = ap.parse_args(argv)
    for m in args.slots:
        if args.window % m:
            raise SystemExit(f"--slots {m} does not divide --window {args.window}")
    rows = capacity_table(args.seq_len, args.pairs, args.window, args.slots, args.swa, args.gates, args.placements,
                          args.examples)  # fmt: skip
    print(f"{'mixer':<6} {'gates':<13} {'pairs':<7} {'W':>5} {'m':>4} {'majority':>9} {'plurality':>10}")
    for r in rows:
        print(f"{r['mixer']:<6} {r.get('gates', ''):<13} {r['placement']:<7} {r['window']:>5} {r.get('slots', ''):>4} "
              f"{r['majority']:9.3f} {r['plurality']:10.3f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    if args.png:
        plot(rows, args.png)


if __name__ == "__main__":
    main()
