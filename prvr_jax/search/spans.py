"""Token spans in the resampled rows -> time spans in seconds, and the moment of a hit.

The definitions live in `prvr_jax.ops.moments` (see its docstring), because evaluation scores the
same moment search returns: `choose_moment` (which branch, which token) and the row -> seconds
conversion below are the one implementation both use.
"""

from __future__ import annotations

from prvr_jax.ops.moments import (BRANCHES, choose_moment, frame_row_spans, row_frame_ranges,
                                  rows_to_seconds)

__all__ = ["BRANCHES", "choose_moment", "frame_row_spans", "row_frame_ranges", "rows_to_seconds"]
