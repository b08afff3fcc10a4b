"""The gates a challenger model must pass to replace the champion."""

from __future__ import annotations

from deepfake_detector.params import PromoteParams


def robustness_drop(metrics: dict[str, float]) -> float | None:
    """Clean test AUC minus the worst perturbed AUC (``test_robustness.*.auc`` run metrics)."""
    perturbed = [v for k, v in metrics.items() if k.startswith("test_robustness.") and k.endswith(".auc")]
    return metrics["test_roc_auc"] - min(perturbed) if perturbed else None


def decide(challenger: dict[str, float], champion: dict[str, float] | None,
           gates: PromoteParams) -> tuple[bool, list[str]]:
    """Whether ``challenger`` passes every gate, and one reason per gate (passed or not)."""
    reasons, passed = [], True
    auc = challenger.get("test_roc_auc")
    if auc is None:
        return False, ["challenger has no test_roc_auc: evaluate it first"]
    ok = auc >= gates.min_auc
    passed &= ok
    reasons.append(f"{'pass' if ok else 'FAIL'}: test AUC {auc:.4f} {'>=' if ok else '<'} min_auc {gates.min_auc}")
    if champion and "test_roc_auc" in champion:
        floor = champion["test_roc_auc"] - gates.max_auc_drop
        ok = auc >= floor
        passed &= ok
        reasons.append(f"{'pass' if ok else 'FAIL'}: test AUC {auc:.4f} {'>=' if ok else '<'} champion's "
                       f"{champion['test_roc_auc']:.4f} - max_auc_drop {gates.max_auc_drop}")
    else:
        reasons.append("pass: no champion to compare with")
    drop = robustness_drop(challenger)
    if drop is None:
        passed = False
        reasons.append("FAIL: no robustness metrics (test_robustness.*.auc)")
    else:
        ok = drop <= gates.max_robustness_drop
        passed &= ok
        reasons.append(f"{'pass' if ok else 'FAIL'}: worst robustness AUC drop {drop:.4f} "
                       f"{'<=' if ok else '>'} max_robustness_drop {gates.max_robustness_drop}")
    return passed, reasons
