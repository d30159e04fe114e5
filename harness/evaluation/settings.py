"""`EvalSettings`: how `harness eval` and a grid spec's `eval:` block evaluate a model (import-light)."""

from __future__ import annotations

from dataclasses import dataclass

from harness.errors import HarnessError
from harness.settings import setting


@dataclass(frozen=True)
class EvalSettings:
    limit: int | float | None = setting(None, "samples per task (a fraction if < 1)")
    batch_size: int = setting(32, "samples per generation batch", positive=True)
    device: str | None = setting(None, "cpu, cuda, cuda:1 (default: cuda if available)")
    dtype: str | None = setting(None, "float32 (default), bfloat16 or float16")
    efficiency: bool = setting(True, "measure latency and memory too (`--no-efficiency` skips it)", flag=False)

    def validate(self) -> EvalSettings:
        if self.limit is not None and not self.limit > 0:
            raise HarnessError(f"limit must be a positive number (samples per task, a fraction if < 1) or null, "
                               f"got {self.limit!r}")
        return self
