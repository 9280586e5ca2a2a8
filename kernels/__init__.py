"""BLA operators: the public API (spec section 4) and its backends.

``bla_attention`` runs whole sequences (chunked), ``bla_step`` one decode step. Backends sit
side by side: ``reference`` (the recurrence), ``torch`` (chunked, vectorised) and ``triton``.
``gsa_chunked`` (beside its reference ``gsa_recurrent``) is GSA with learned gates, a baseline.
"""

import sys

if __name__ == "kernels":
    # This folder is `bla.kernels`; imported as a plain `kernels` it was found because the repository
    # root is on sys.path (`python -c`, `python -m` or pytest started there), and it would shadow
    # Hugging Face's `kernels` package, which transformers >= 5.25 requires and imports. Hand the name
    # over to that package: the import system returns what sys.modules holds once this file ran.
    import importlib.machinery
    import importlib.util
    import os

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None:
        raise ImportError(f"`import kernels` found bla's kernels folder under {_root} (on sys.path), which is "
                          "imported as `bla.kernels`; no other `kernels` package is installed")  # fmt: skip
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
else:
    from .api import BACKENDS, bla_attention, bla_step, bla_step_, triton_available
    from .gates import DEFAULT_GATES, GATES, LEGACY_GATES, dirichlet_gates
    from .gsa import gsa_chunked, gsa_recurrent

    __all__ = ["BACKENDS", "DEFAULT_GATES", "GATES", "LEGACY_GATES", "bla_attention", "bla_step", "bla_step_", "dirichlet_gates", "gsa_chunked", "gsa_recurrent", "triton_available"]
