"""The summary table printed at the end of ``python -m pytest bench/ --benchmark-only``.

Targets (issue 3, 2 CPU cores): peftcore's training step at most 0.70 x HF PEFT's (dropout 0.1)
and at most 1.10 x the frozen-base floor; peftcore's extra peak memory over the floor at most
0.4 x HF PEFT's extra; an unmerged adapter's inference at most 1.08 x the base forward.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import random
import statistics
from pathlib import Path

LABELS = {
    "floor": "frozen-base floor (gradient to the input embeddings)",
    "hf_peft_p0.1": "HF PEFT LoRA, dropout 0.1",
    "hf_peft_p0": "HF PEFT LoRA, dropout 0",
    "full": "full fine-tuning",
    "peftcore_p0.1": "peftcore LoRA, dropout 0.1",
    "peftcore_p0": "peftcore LoRA, dropout 0",
    "peftcore_ref_p0.1": "peftcore LoRA, dropout 0.1, reference backend",
}
INFERENCE_LABELS = {"base": "base model", "peftcore": "peftcore, unmerged adapter", "hf_peft": "HF PEFT, unmerged adapter"}

#: How far apart the same reference setup may measure in its own test and interleaved before the
#: summary says that the machine's load changed during the run.
DRIFT = 0.05

#: Bootstrap resamples for the paired ratios' intervals (fixed seed: a run's summary reads the same
#: when rendered again).
RESAMPLES = 2000


def paired_ratio(times: list[float], reference: list[float], resamples: int = RESAMPLES,
                 seed: int = 0) -> tuple[float, float, float] | None:
    """The median over rounds of ``times[i] / reference[i]`` (both measured in round ``i``, under
    the same load), and its 95 % percentile-bootstrap interval (rounds resampled with
    replacement): ``(median, low, high)``. ``None`` with fewer than 2 rounds.

    On a shared machine whose load comes and goes over seconds, the ratio of two medians taken
    over the same rounds can still be several per cent off (each median may fall in a different
    stretch of load); a ratio within the round cancels the load, and the interval says how far
    the rounds leave it uncertain.
    """
    if len(times) != len(reference):
        raise ValueError(f"paired ratio: {len(times)} times against {len(reference)} reference times; "
                         "pass the two setups' times from the same interleaved rounds")
    if len(times) < 2:
        return None
    ratios = [t / r for t, r in zip(times, reference)]
    rng = random.Random(seed)
    n = len(ratios)
    medians = sorted(statistics.median(rng.choices(ratios, k=n)) for _ in range(resamples))
    return statistics.median(ratios), medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def _paired(rounds: dict[str, list[float]], key: str, reference: str) -> tuple[float, float, float] | None:
    """``paired_ratio`` of setup ``key`` over ``reference`` from the same interleaved rounds, if both ran."""
    return paired_ratio(rounds[key], rounds[reference]) if key in rounds and reference in rounds else None


def _paired_text(got: tuple[float, float, float] | None) -> str:
    return f"{got[0]:.3f} [{got[1]:.3f}, {got[2]:.3f}]" if got else "-"


@dataclasses.dataclass
class Results:
    """What the benchmarks measured in this run (seconds, MiB)."""

    step_s: dict[str, float] = dataclasses.field(default_factory=dict)  # median
    step_min_s: dict[str, float] = dataclasses.field(default_factory=dict)
    interleaved_s: dict[str, float] = dataclasses.field(default_factory=dict)  # median, setups alternating
    peak_mb: dict[str, float] = dataclasses.field(default_factory=dict)
    inference_s: dict[str, float] = dataclasses.field(default_factory=dict)
    inference_interleaved_s: dict[str, float] = dataclasses.field(default_factory=dict)  # median, alternating
    interleaved_rounds_s: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # every round's time
    inference_interleaved_rounds_s: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # the same
    ops: list[tuple[str, str, str, float, float]] = dataclasses.field(default_factory=list)  # shape, backend, pass, median, min
    # shape, backend, every round's fwd+bwd time of linear and of the backend (alternating)
    ops_interleaved: list[tuple[str, str, list[float], list[float]]] = dataclasses.field(default_factory=list)
    bottleneck_ops: list[tuple[str, str, str, float, float]] = dataclasses.field(default_factory=list)  # the same

    def empty(self) -> bool:
        return not (self.step_s or self.interleaved_s or self.peak_mb or self.inference_s or self.inference_interleaved_s
                    or self.ops or self.ops_interleaved or self.bottleneck_ops)

    # -- targets -----------------------------------------------------------------------------
    def targets(self) -> list[tuple[str, float | None, float, tuple[float, float] | None]]:
        """(what, measured ratio or None, limit, 95 % interval of a paired ratio or None)."""
        s, m, i = self.step_s, self.peak_mb, self.inference_s
        ratio = lambda a, b: a / b if a is not None and b else None  # noqa: E731
        extra = lambda k: m[k] - m["floor"] if k in m and "floor" in m else None  # noqa: E731
        il, ii = self.interleaved_s, self.inference_interleaved_s
        rs, ri = self.interleaved_rounds_s, self.inference_interleaved_rounds_s

        def paired(rounds: dict[str, list[float]], key: str, reference: str) -> tuple[float | None, tuple[float, float] | None]:
            got = _paired(rounds, key, reference)
            return (got[0], got[1:]) if got else (None, None)

        vs_hf, vs_hf_interval = paired(rs, "peftcore_p0.1", "hf_peft_p0.1")
        vs_floor, vs_floor_interval = paired(rs, "peftcore_p0.1", "floor")
        vs_base, vs_base_interval = paired(ri, "peftcore", "base")
        return [
            ("peftcore step / HF PEFT step (dropout 0.1)", ratio(s.get("peftcore_p0.1"), s.get("hf_peft_p0.1")), 0.70, None),
            ("peftcore step / floor step", ratio(s.get("peftcore_p0.1"), s.get("floor")), 1.10, None),
            ("  the same, setups interleaved: / HF PEFT", ratio(il.get("peftcore_p0.1"), il.get("hf_peft_p0.1")), 0.70, None),
            ("  the same, setups interleaved: / floor", ratio(il.get("peftcore_p0.1"), il.get("floor")), 1.10, None),
            ("  the same, paired per round: / HF PEFT", vs_hf, 0.70, vs_hf_interval),
            ("  the same, paired per round: / floor", vs_floor, 1.10, vs_floor_interval),
            ("peftcore extra peak RSS / HF PEFT extra (dropout 0.1)",
             ratio(extra("peftcore_p0.1"), extra("hf_peft_p0.1")), 0.40, None),
            ("peftcore unmerged inference / base forward", ratio(i.get("peftcore"), i.get("base")), 1.08, None),
            ("  the same, interleaved", ratio(ii.get("peftcore"), ii.get("base")), 1.08, None),
            ("  the same, paired per call", vs_base, 1.08, vs_base_interval),
        ]

    def drift(self) -> list[str]:
        """Notes for each reference setup (floor, base forward) whose own test and interleaved
        median differ by more than ``DRIFT``: the load changed between the tests, so the
        separate-test ratios are off and the interleaved ones (same load for every setup) hold."""
        notes = []
        for what, own, alternating in (("floor step", self.step_s.get("floor"), self.interleaved_s.get("floor")),
                                       ("base forward", self.inference_s.get("base"), self.inference_interleaved_s.get("base"))):
            if own and alternating and abs(own / alternating - 1) > DRIFT:
                notes.append(f"load changed during the run: the {what} took {own:.3f} s in its own test and "
                             f"{alternating:.3f} s interleaved ({abs(own / alternating - 1):.0%} apart); "
                             "read the interleaved ratios")
        return notes

    def render(self, threads: int) -> str:
        lines = [f"machine: {platform.processor() or platform.machine()}, torch threads: {threads}", ""]
        if self.step_s or self.peak_mb:
            floor_s, floor_mb = self.step_s.get("floor"), self.peak_mb.get("floor")
            lines += ["training step, all-MiniLM-L6-v2 seq. classification, batch 16 x 128, LoRA r8 a16 on q/k/v/dense",
                      f"{'setup':<52} {'median step':>12} {'x floor':>8} {'min step':>9} {'peak RSS':>10} {'extra':>8}"]
            for key, label in LABELS.items():
                if key not in self.step_s and key not in self.peak_mb:
                    continue
                t, mb, t_min = self.step_s.get(key), self.peak_mb.get(key), self.step_min_s.get(key)
                lines.append(
                    f"{label:<52} {_fmt(t, '{:.3f} s'):>12} {_fmt(t and floor_s and t / floor_s, '{:.2f}'):>8} "
                    f"{_fmt(t_min, '{:.3f} s'):>9} {_fmt(mb, '{:.0f} MB'):>10} "
                    f"{_fmt(mb is not None and floor_mb and mb - floor_mb, '{:+.0f}'):>8}"
                )
            lines.append("")
        if self.interleaved_s:
            base = self.interleaved_s.get("floor")
            lines.append("training step, the setups below alternating step by step in one process (drift cancels)")
            lines.append(f"{'setup':<52} {'median step':>12} {'x floor':>8}  {'paired x floor [95 % interval]':>30}")
            for key, t in self.interleaved_s.items():
                shown = _paired_text(_paired(self.interleaved_rounds_s, key, "floor"))
                lines.append(f"{LABELS[key]:<52} {t:>10.3f} s {_fmt(base and t / base, '{:.2f}'):>8}  {shown:>30}")
            lines.append("")
        for title, times in (("inference, batch 32 x 64, eval, no_grad", self.inference_s),
                             ("inference, the setups below alternating call by call", self.inference_interleaved_s)):
            if not times:
                continue
            base = times.get("base")
            lines.append(title)
            for key, label in INFERENCE_LABELS.items():
                if key in times:
                    t = times[key]
                    lines.append(f"{label:<52} {t * 1e3:>9.1f} ms {_fmt(base and t / base, '{:.3f}'):>8}")
            lines.append("")
        checks = [check for check in self.targets() if check[1] is not None]
        if checks:
            lines.append("targets (paired: the median of per-round ratios, [95 % bootstrap interval])")
            for what, value, limit, interval in checks:
                if interval is None:
                    verdict, shown = ("met" if value <= limit else "NOT met"), ""
                else:
                    low, high = interval
                    verdict = "met" if high <= limit else "NOT met" if low > limit else "undecided: the interval spans the limit"
                    shown = f" [{low:.3f}, {high:.3f}]"
                number = f"{value:.2f}" if interval is None else f"{value:.3f}"
                lines.append(f"{what:<56} {number:>6}  (<= {limit:.2f})  {verdict}{shown}")
            lines += self.drift()
            lines.append("")
        if self.ops:
            lines.append(f"lora_linear per op, fp32, rank 8, dropout 0.1    {'median ms':>10} {'min ms':>8}")
            for shape, backend, which, t, t_min in self.ops:
                lines.append(f"  {shape:<30} {backend:<10} {which:<8} {t * 1e3:10.2f} {t_min * 1e3:8.2f}")
            lines.append("")
        if self.ops_interleaved:
            # The title runs one column into the first number's field: 44 + 1 + 8 = 2 + 30 + 1 + 10 + 1 + 9.
            lines.append(f"{'lora_linear fwd+bwd, alternating with linear':<44} {'base ms':>8} {'op ms':>9}"
                         "   paired x linear [95 % interval]")
            for shape, backend, base, op in self.ops_interleaved:
                lines.append(f"  {shape:<30} {backend:<10} {statistics.median(base) * 1e3:9.2f} {statistics.median(op) * 1e3:9.2f}"
                             f"   {_paired_text(paired_ratio(op, base))}")
            lines.append("")
        if self.bottleneck_ops:
            lines.append(f"bottleneck per op, fp32, GELU                    {'median ms':>10} {'min ms':>8}")
            for shape, backend, which, t, t_min in self.bottleneck_ops:
                lines.append(f"  {shape:<30} {backend:<10} {which:<8} {t * 1e3:10.2f} {t_min * 1e3:8.2f}")
        return "\n".join(lines)

    def to_json(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2))


def _fmt(value, pattern: str) -> str:
    if value is None or value is False:
        return "-"
    return pattern.format(value)


RESULTS = Results()
