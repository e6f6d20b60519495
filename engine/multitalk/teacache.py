"""TeaCache step caching: skip the 40 DiT blocks when the modulated input has barely moved since the last
computed step, and add the residual (blocks' output - input) cached then instead.

The rule is the reference's (MultiTalk `teacache_init` / forward, "ret steps" variant): per guidance pass,
accumulate rescale(rel-L1(e0_t, e0_prev)) over steps, where e0 is the timestep projection (B, 6, d) that
modulates every block and rescale is a polynomial fitted by the TeaCache authors for the 14B model; while the
sum stays under the threshold the step is skipped, once it crosses it the step is computed and the sum resets.
Each pass (cond / drop_text / uncond / drop_audio) keeps its own sum, previous input and residual, as the
reference does (its `cnt % 3`). A warm-up of `warmup` steps is always computed; the state is fresh per chunk
(new noise). Threshold 0 disables caching altogether, so it equals no caching exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

log = logging.getLogger(__name__)

# Rescale polynomials (highest power first) for the e0 ("ret steps") variant, fitted for Wan 2.1 I2V-14B by
# the TeaCache authors and used by MultiTalk / InfiniteTalk unchanged (multitalk-480 / multitalk-720).
COEFFICIENTS: dict[int, tuple[float, ...]] = {
    480: (2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01),
    720: (8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02),
}
DEFAULT_WARMUP = 5  # the reference's ret_steps (5 steps of every pass)
MAX_THRESHOLD = 1.0  # above ~0.5 colours shift (reference); above 1 nearly every step is skipped


@dataclass
class _PassState:
    accumulated: float = 0.0
    previous: torch.Tensor | None = None  # e0 of this pass at its last call, (6, d)
    residual: torch.Tensor | None = None  # blocks' output - input at the last computed step, (L, d)


@dataclass(frozen=True)
class Decision:
    step: int
    guidance_pass: str
    distance: float  # rescaled rel-L1 added this step (0 during warm-up)
    accumulated: float
    skipped: bool


@dataclass
class TeaCache:
    """One chunk's cache. The transformer asks `should_compute` once per step and pass, then `store`s the
    residual of the passes it computed, or `residual`s the ones it skips."""

    threshold: float
    warmup: int = DEFAULT_WARMUP
    coefficients: tuple[float, ...] = COEFFICIENTS[480]
    passes: dict[str, _PassState] = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._rescale = np.poly1d(self.coefficients)

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    def should_compute(self, step: int, names: tuple[str, ...], e0: torch.Tensor) -> bool:
        """Whether the batch of passes `names` (e0: (B, 6, d)) must run the blocks at this step. Batched
        passes share one forward, so the batch is skipped only when every pass in it may skip; a pass that is
        computed (for whatever reason) restarts its sum, as its residual is fresh."""
        sums = [self._candidate_sum(step, name, e0[j]) for j, name in enumerate(names)]
        skip = all(total is not None and total < self.threshold for total, _ in sums)
        for name, (total, distance) in zip(names, sums, strict=True):
            state = self.passes[name]
            state.accumulated = total if skip else 0.0  # type: ignore[assignment]
            self.decisions.append(Decision(step, name, distance, total or 0.0, skip))
        if skip:
            log.info("teacache: step %d %s skipped (sums %s < %g)", step, "+".join(names),
                     ", ".join(f"{t:.4f}" for t, _ in sums), self.threshold)  # fmt: skip
        else:
            log.debug("teacache: step %d %s computed", step, "+".join(names))
        return not skip

    def _candidate_sum(self, step: int, name: str, e0: torch.Tensor) -> tuple[float | None, float]:
        """(the pass's sum if this step were skipped, or None when it must compute; the distance added)."""
        state = self.passes.setdefault(name, _PassState())
        previous, state.previous = state.previous, e0.detach()
        if not self.enabled or step < self.warmup or previous is None or state.residual is None:
            return None, 0.0
        previous = previous.float()
        relative = ((e0.float() - previous).abs().mean() / previous.abs().mean()).item()
        distance = float(self._rescale(relative))
        return state.accumulated + distance, distance

    def store(self, names: tuple[str, ...], residual: torch.Tensor) -> None:
        """residual: (B, L, d), one row per pass of `names`."""
        for j, name in enumerate(names):
            self.passes[name].residual = residual[j].detach()

    def residual(self, names: tuple[str, ...]) -> torch.Tensor:
        return torch.stack([self.passes[name].residual for name in names])  # type: ignore[misc]

    def summary(self) -> dict[str, object]:
        """Counts for the render result: steps skipped and computed per pass."""
        skipped: dict[str, int] = {}
        computed: dict[str, int] = {}
        for d in self.decisions:
            counts = skipped if d.skipped else computed
            counts[d.guidance_pass] = counts.get(d.guidance_pass, 0) + 1
        return {
            "threshold": self.threshold, "warmup": self.warmup, "skipped": skipped, "computed": computed,
            "skipped_total": sum(skipped.values()), "computed_total": sum(computed.values()),
        }  # fmt: skip


def coefficients_for(size: int) -> tuple[float, ...]:
    """The fitted polynomial of the render size (480 or 720; other sizes use 480's)."""
    return COEFFICIENTS.get(size, COEFFICIENTS[480])


def merge_summaries(summaries: list[dict[str, object]]) -> dict[str, object]:
    """Per-chunk summaries -> one for the render (counts added)."""
    if not summaries:
        return {}
    out: dict[str, object] = {k: summaries[0][k] for k in ("threshold", "warmup")}
    for key in ("skipped", "computed"):
        total: dict[str, int] = {}
        for s in summaries:
            for name, n in s[key].items():  # type: ignore[attr-defined]
                total[name] = total.get(name, 0) + n
        out[key] = total
    out["skipped_total"] = sum(out["skipped"].values())  # type: ignore[attr-defined]
    out["computed_total"] = sum(out["computed"].values())  # type: ignore[attr-defined]
    return out


@dataclass(frozen=True)
class CacheCall:
    """What one DiT forward needs to consult the cache: the chunk's cache, the step, the passes batched."""

    cache: TeaCache
    step: int
    passes: tuple[str, ...]
