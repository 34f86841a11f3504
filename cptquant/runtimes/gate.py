"""`cptq verify`'s gate: the thresholds (parsed from the command line) and the checks of the measured figures
against them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import CptqError
from ..model_loading import CLASSIFIER_TASKS, TASK_CAUSAL_LM, TASK_FEATURES, TASK_MASKED_LM, TASK_SEQ2SEQ
from ..output_folder import VERIFY_CANDIDATE
from .speed_gate import INCONCLUSIVE, PASS

CANDIDATE = VERIFY_CANDIDATE


@dataclass
class Thresholds:
    max_ppl_increase: float = 0.02  # relative: 0.02 = perplexity may grow by 2 %
    max_accuracy_drop: float = 0.01  # absolute: 0.01 = one point of accuracy (or of agreement)
    min_cosine: float = 0.99  # mean cosine of pooled embeddings
    min_speedup: float = 1.0  # geometric mean of paired baseline / candidate times; gated on its interval
    max_kl: float | None = None  # causal LM: mean KL divergence of next-token distributions (None: not gated)


def parse_fraction(text: str, option: str, high: float = math.inf) -> float:
    """'2%' or '0.02' -> 0.02. One clear error for anything else (or above `high`)."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100.0 if raw.endswith("%") else float(raw)
    except ValueError:
        raise CptqError(f"{option} must be a number or a percentage like 2% (got {text!r})") from None
    if not math.isfinite(value) or value < 0:
        raise CptqError(f"{option} must be a non-negative finite number (got {text!r})")
    if value > high:
        raise CptqError(f"{option} must be at most {high * 100:g}% (got {text!r})")
    return value


def parse_number(text: str, option: str, low: float = 0.0, high: float = math.inf) -> float:
    try:
        value = float(str(text).strip())
    except ValueError:
        raise CptqError(f"{option} must be a number (got {text!r})") from None
    if not (math.isfinite(value) and low <= value <= high):
        bounds = f"between {low:g} and {high:g}" if math.isfinite(high) else f"a finite number of at least {low:g}"
        raise CptqError(f"{option} must be {bounds} (got {text!r})")
    return value


@dataclass
class Check:
    ep: str
    name: str
    measured: float
    threshold: float
    at_most: bool  # True: measured must be <= threshold; False: >=
    percent: bool = False

    @property
    def passed(self) -> bool:
        return self.measured <= self.threshold if self.at_most else self.measured >= self.threshold

    def _fmt(self, x: float, digits: int = 4) -> str:
        return f"{x * 100:.{digits - 1}g}%" if self.percent else f"{x:.{digits}g}"

    def _pair(self) -> tuple[str, str]:
        """Measured and threshold with digits enough to tell them apart ("0.9999998 < 0.9999999", not "1 < 1")."""
        for digits in range(4, 16):
            shown = self._fmt(self.measured, digits), self._fmt(self.threshold, digits)
            if shown[0] != shown[1] or self.measured == self.threshold:
                return shown
        return shown

    def line(self) -> str:
        relation = ("<=" if self.passed else ">") if self.at_most else (">=" if self.passed else "<")
        verdict = "PASS" if self.passed else "FAIL"
        measured, threshold = self._pair()
        return f"{verdict} [{self.ep}] {self.name}: {measured} {relation} {threshold}"

    def to_dict(self) -> dict[str, Any]:
        return {"ep": self.ep, "name": self.name, "measured": self.measured, "threshold": self.threshold,
                "comparison": "<=" if self.at_most else ">=", "passed": self.passed, "line": self.line()}


def gate(ep: str, measured: dict[str, Any], task: str, baseline: str, thresholds: Thresholds) -> list[Check]:
    vs_quality = measured["quality"][f"vs_{baseline}"]
    checks = []
    if task in (TASK_CAUSAL_LM, TASK_SEQ2SEQ):  # an encoder-decoder: teacher-forced (runtimes/seq2seq.py)
        checks.append(Check(ep, f"perplexity increase vs {baseline}", vs_quality["ppl_increase"],
                            thresholds.max_ppl_increase, True, percent=True))
        if thresholds.max_kl is not None:
            checks.append(Check(ep, f"mean KL divergence from {baseline}", vs_quality["kl_divergence"],
                                thresholds.max_kl, True))
    elif task in CLASSIFIER_TASKS + (TASK_MASKED_LM,):
        what = "accuracy drop" if measured["quality"]["variants"][CANDIDATE].get("accuracy") is not None \
            else "disagreement (accuracy drop taking the baseline as labels)"
        checks.append(Check(ep, f"{what} vs {baseline}", vs_quality["accuracy_drop"], thresholds.max_accuracy_drop,
                            True, percent=True))
    elif task == TASK_FEATURES:
        checks.append(Check(ep, f"mean cosine vs {baseline}", vs_quality["mean_cosine"], thresholds.min_cosine, False))
    checks.append(speed_check(ep, baseline, measured["speed"][f"vs_{baseline}"], thresholds.min_speedup))
    return checks


@dataclass
class SpeedCheck(Check):
    """The speed gate: fails only when the whole confidence interval lies below the threshold."""

    low: float = 0.0
    high: float = 0.0
    confidence: float = 0.95
    rounds: int = 0
    verdict: str = INCONCLUSIVE

    @property
    def passed(self) -> bool:
        return self.verdict in (PASS, INCONCLUSIVE)

    def line(self) -> str:
        where = {PASS: ">=", INCONCLUSIVE: "straddles"}.get(self.verdict, "<")
        span = f"{self.measured:.4g} ({self.confidence:.0%} interval {self.low:.4g}-{self.high:.4g}, {self.rounds} rounds)"
        tail = "; not failed: rerun on a quieter machine to settle it" if self.verdict == INCONCLUSIVE else ""
        return f"{self.verdict.upper()} [{self.ep}] {self.name}: {span} {where} {self._fmt(self.threshold)}{tail}"

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "low": self.low, "high": self.high, "confidence": self.confidence,
                "rounds": self.rounds, "verdict": self.verdict}


def speed_check(ep: str, baseline: str, vs: dict[str, Any], threshold: float) -> Check:
    interval = vs.get("speedup_interval")
    if interval is None:  # measured without a gate (the export's short verification): the point ratio
        return Check(ep, f"speed-up vs {baseline} (geometric mean of p50 ratios)", vs["geomean_speedup"],
                     threshold, False)
    return SpeedCheck(ep, f"speed-up vs {baseline} (geometric mean of paired ratios)", interval["estimate"],
                      threshold, False, low=interval["low"], high=interval["high"],
                      confidence=interval["confidence"], rounds=min(interval["rounds"].values()),
                      verdict=interval["verdict"])


