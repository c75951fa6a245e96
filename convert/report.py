"""The end-of-conversion summary: bits per weight, size on disk, quantization error."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .layout import KINDS, kind_of


@dataclass
class Report:
    out_dir: Path | None = None
    parameters: int = 0
    weight_bytes: int = 0  # all tensor bytes written, scales and biases included
    disk_bytes: int = 0
    seconds: float = 0.0
    description: str = ""
    skipped: list[str] = field(default_factory=list)
    # kind -> [squared error sum, squared norm sum], over sampled rows
    _kind_sums: dict[str, list[float]] = field(default_factory=dict)
    tensor_error: dict[str, float] = field(default_factory=dict)  # relative RMS error per tensor

    def add_error(self, name: str, err2: float, ref2: float) -> None:
        sums = self._kind_sums.setdefault(kind_of(name) or "other", [0.0, 0.0])
        sums[0] += err2
        sums[1] += ref2
        self.tensor_error[name] = math.sqrt(err2 / ref2) if ref2 > 0 else 0.0

    @property
    def bits_per_weight(self) -> float:
        return self.weight_bytes * 8 / self.parameters if self.parameters else 0.0

    @property
    def kind_error(self) -> dict[str, float]:
        order = {k: i for i, k in enumerate(KINDS)}
        return {k: math.sqrt(e / r) if r > 0 else 0.0
                for k, (e, r) in sorted(self._kind_sums.items(), key=lambda kv: order.get(kv[0], 99))}

    @property
    def worst(self) -> tuple[str, float] | None:
        if not self.tensor_error:
            return None
        return max(self.tensor_error.items(), key=lambda kv: kv[1])

    def lines(self) -> list[str]:
        out = [
            f"wrote {self.out_dir} ({self.description}) in {self.seconds:.1f}s",
            f"  parameters      {self.parameters:,}",
            f"  size on disk    {_human(self.disk_bytes)}",
            f"  bits per weight {self.bits_per_weight:.3f}",
        ]
        if self.skipped:
            out.append(f"  left float      {len(self.skipped)} matrices (input dim not divisible by the group size)")
        if self.tensor_error:
            out.append("  relative RMS quantization error by kind:")
            out += [f"    {k:<8} {v:.4f}" for k, v in self.kind_error.items()]
            name, err = self.worst
            out.append(f"  worst tensor    {name} ({err:.4f})")
        return out


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"
