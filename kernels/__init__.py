"""BLA operators: the public API (spec section 4) and its backends.

``bla_attention`` runs whole sequences (chunked), ``bla_step`` one decode step. Backends sit
side by side: ``reference`` (the recurrence), ``torch`` (chunked, vectorised) and ``triton``.
"""

from .api import BACKENDS, bla_attention, bla_step, triton_available
from .gates import dirichlet_gates

__all__ = ["BACKENDS", "bla_attention", "bla_step", "dirichlet_gates", "triton_available"]
