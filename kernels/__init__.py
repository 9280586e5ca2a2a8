"""BLA operators: the public API (spec section 4) and its backends.

``bla_attention`` runs whole sequences (chunked), ``bla_step`` one decode step. Backends sit
side by side: ``reference`` (the recurrence), ``torch`` (chunked, vectorised) and ``triton``.
``gsa_chunked`` (beside its reference ``gsa_recurrent``) is GSA with learned gates, a baseline.
"""

from .api import BACKENDS, bla_attention, bla_step, bla_step_, triton_available
from .gates import DEFAULT_GATES, GATES, LEGACY_GATES, dirichlet_gates
from .gsa import gsa_chunked, gsa_recurrent

__all__ = ["BACKENDS", "DEFAULT_GATES", "GATES", "LEGACY_GATES", "bla_attention", "bla_step", "bla_step_", "dirichlet_gates", "gsa_chunked", "gsa_recurrent", "triton_available"]
