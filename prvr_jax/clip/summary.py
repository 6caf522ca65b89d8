"""What an extraction run did, for the final report and for tests."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Summary:
  """Counts of one extraction run.

  Attributes:
    kind: 'videos' or 'captions'.
    out: the output file.
    listed: items considered (after --max-items).
    done: items extracted by this run.
    skipped_existing: items already in the output (or its parts) from an earlier run.
    failed: {'id', 'reason'} per item that could not be extracted.
    notes: other remarks (e.g. captions truncated to the model's length).
    total_in_output: items in the output file at the end.
  """

  kind: str
  out: str
  listed: int = 0
  done: int = 0
  skipped_existing: int = 0
  failed: list[dict[str, str]] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)
  total_in_output: int = 0

  def text(self) -> str:
    """The report printed at the end of a run."""
    lines = [f"{self.kind}: {self.listed} listed, {self.done} done, {self.skipped_existing} skipped "
             f"(already in the output), {len(self.failed)} failed",
             f"output: {self.out} ({self.total_in_output} items)"]
    lines += [f"  failed {f['id']}: {f['reason']}" for f in self.failed]
    lines += [f"  note: {n}" for n in self.notes]
    return "\n".join(lines)
