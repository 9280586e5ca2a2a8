"""Loss against state as a law (issue 44): ``loss = a + b * state^-c`` fitted per mixer over a
sweep's reported points, and how much state each mixer needs to match another's losses.

The fit is least squares in the loss: for a given ``c`` the law is linear in ``a`` and ``b``, so
``c`` is searched (a log grid, then golden-section refinement) with ``a`` and ``b`` solved in
closed form at each ``c``. ``a`` is the loss the mixer tends to with unlimited state, ``b`` and
``c`` how fast it gets there. With three points the law passes through all of them (no error is
measurable); the fit error means something from four points on. Pure Python: a sweep's report
has at most tens of points.
"""

from __future__ import annotations

import math

C_RANGE = (1e-3, 3.0)  # exponents searched: flatter than state^-0.001 is no law, steeper than state^-3 no sweep resolves
GRID = 300


def _linear_fit(u: list[float], y: list[float]) -> tuple[float, float, float] | None:
    """(a, b, sum of squared residuals) of y = a + b u, or None when u does not vary."""
    n = len(u)
    mu, my = sum(u) / n, sum(y) / n
    var = sum((x - mu) ** 2 for x in u)
    if var <= 1e-300:
        return None
    b = sum((x - mu) * (v - my) for x, v in zip(u, y)) / var
    a = my - b * mu
    return a, b, sum((a + b * x - v) ** 2 for x, v in zip(u, y))


def _check(states: list[float], losses: list[float]) -> None:
    if len(states) != len(losses):
        raise ValueError(f"a law needs one loss per state: got {len(states)} states and {len(losses)} losses")
    bad = [s for s in states if not (isinstance(s, (int, float)) and s > 0)]
    if bad:
        raise ValueError(f"states must be positive numbers of elements, got {bad[:3]}")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in losses):
        raise ValueError(f"losses must be finite numbers, got {losses}")


def fit_power_law(states: list[float], losses: list[float]) -> dict | None:
    """``{"a", "b", "c", "rmse", "max_residual", "points", "states"}`` of the law through
    (state, loss) points, or None with fewer than three distinct states. ``states`` are scaled by
    their geometric mean inside the search, so the exponent's grid does not depend on units."""
    _check(states, losses)
    if len(set(states)) < 3:
        return None
    scale = math.exp(sum(math.log(s) for s in states) / len(states))
    x = [s / scale for s in states]

    def sse(c: float) -> float:
        fit = _linear_fit([v ** -c for v in x], losses)
        return math.inf if fit is None else fit[2]

    lo, hi = (math.log(v) for v in C_RANGE)
    grid = [math.exp(lo + (hi - lo) * i / (GRID - 1)) for i in range(GRID)]
    best = min(range(GRID), key=lambda i: sse(grid[i]))
    left, right = grid[max(best - 1, 0)], grid[min(best + 1, GRID - 1)]
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(60):  # golden-section search inside the grid cell around the best exponent
        m1, m2 = right - golden * (right - left), left + golden * (right - left)
        if sse(m1) <= sse(m2):
            right = m2
        else:
            left = m1
    c = (left + right) / 2
    a, b_scaled, residual = _linear_fit([v ** -c for v in x], losses)
    residuals = [a + b_scaled * v ** -c - y for v, y in zip(x, losses)]
    return {"a": a, "b": b_scaled * scale**c, "c": c, "rmse": math.sqrt(residual / len(x)),
            "max_residual": max(abs(r) for r in residuals), "points": len(x), "states": [min(states), max(states)]}  # fmt: skip


def law_value(law: dict, state: float) -> float:
    return law["a"] + law["b"] * state ** -law["c"]


def state_for(law: dict, loss: float) -> float | None:
    """The state at which the law reaches ``loss``; None where it never does (at or below its
    asymptote ``a``, or a law that does not fall with state)."""
    if law["b"] <= 0 or loss <= law["a"]:
        return None
    return (law["b"] / (loss - law["a"])) ** (1 / law["c"])


def loss_laws(points: list[dict], metric: str = "loss") -> dict:
    """Per mixer with three or more state sizes: its law; and for each such mixer, every other
    mixer's points matched: the state the law needs for that point's loss and how many times less
    than the point's state that is (``extrapolated`` when outside the states the law was fitted on)."""
    by_mixer: dict[str, list[dict]] = {}
    for p in points:  # a point without a finite metric or a state size (a failed evaluation) joins no law
        state = p.get("state_elements")
        if isinstance(p.get(metric), (int, float)) and math.isfinite(p[metric]) and isinstance(state, (int, float)) and state > 0:
            by_mixer.setdefault(p["mixer"], []).append(p)
    laws = {}
    for mixer, mine in sorted(by_mixer.items()):
        law = fit_power_law([p["state_elements"] for p in mine], [p[metric] for p in mine])
        if law is not None:
            laws[mixer] = law
    matches = {}
    for mixer, law in laws.items():
        rows = []
        for peer, theirs in sorted(by_mixer.items()):
            if peer == mixer:
                continue
            for p in sorted(theirs, key=lambda q: q["state_elements"]):
                need = state_for(law, p[metric])
                rows.append({"peer": peer, "peer_state": p["state_elements"], "peer_" + metric: p[metric], "state": need,
                             "times_less_state": None if need is None else p["state_elements"] / need,
                             "extrapolated": need is not None and not law["states"][0] <= need <= law["states"][1]})  # fmt: skip
        matches[mixer] = rows
    return {"metric": metric, "law": "loss = a + b * state^-c", "laws": laws, "matches": matches}
