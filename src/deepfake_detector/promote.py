"""``deepfake promote``: the gates a challenger model must pass to replace the champion, and the
alias move that records the decision."""

from __future__ import annotations

import math
import time

from deepfake_detector.errors import UserError
from deepfake_detector.params import Params, PromoteParams

# A robustness row's figures per source, ``test_robustness.<row>.<section>.<source>``: never rows themselves.
ROW_SECTIONS = (".sources.", ".source_fpr.")


def robustness_drop(metrics: dict[str, float]) -> float | None:
    """Clean test AUC minus the worst perturbed AUC (``test_robustness.<row>.auc`` run metrics; not a
    row's per-source figures, whatever the source's name)."""
    perturbed = [v for k, v in metrics.items() if k.startswith("test_robustness.") and k.endswith(".auc")
                 and not any(section in k for section in ROW_SECTIONS)]
    return metrics["test_roc_auc"] - min(perturbed) if perturbed else None


def _per_source(metrics: dict[str, float], key: str) -> list[tuple[str, float]]:
    """(source, value) of each ``test_per_source.<source>.<key>`` run metric."""
    return [(k.split(".")[1], v) for k, v in metrics.items()
            if k.startswith("test_per_source.") and k.endswith(f".{key}") and k.count(".") == 2]


def worst_source(metrics: dict[str, float]) -> tuple[str, float] | None:
    """The source whose fakes the model separates worst from the reals, and its test AUC
    (``test_per_source.<source>.roc_auc`` run metrics; an undefined AUC counts as worst); None without any."""
    aucs = _per_source(metrics, "roc_auc")
    return min(aucs, key=lambda item: (not math.isnan(item[1]), item[1])) if aucs else None


def worst_real_source(metrics: dict[str, float]) -> tuple[str, float] | None:
    """The source of real faces the model calls fake most often, and that test false positive rate
    (``test_per_source.<source>.false_positive_rate``; an undefined one counts as worst); None without
    any (a model evaluated before real sources were reported)."""
    rates = _per_source(metrics, "false_positive_rate")
    return max(rates, key=lambda item: (math.isnan(item[1]), item[1])) if rates else None


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
    worst = worst_source(challenger)
    if worst is None:
        reasons.append("pass: no per-source metrics (one source)")
    else:
        ok = worst[1] >= gates.min_source_auc
        passed &= ok
        reasons.append(f"{'pass' if ok else 'FAIL'}: worst source {worst[0]}'s test AUC {worst[1]:.4f} "
                       f"{'>=' if ok else '<'} min_source_auc {gates.min_source_auc}")
    worst = worst_real_source(challenger)
    if worst is None:
        reasons.append("pass: no per-source false positive rates (evaluated before real sources were reported)")
    else:
        ok = worst[1] <= gates.max_source_fpr
        passed &= ok
        reasons.append(f"{'pass' if ok else 'FAIL'}: worst real source {worst[0]}'s test false positive rate "
                       f"{worst[1]:.4f} {'<=' if ok else '>'} max_source_fpr {gates.max_source_fpr}")
    return passed, reasons


def promote(p: Params, dry_run: bool = False, force: bool = False) -> dict:
    """Move ``promote.alias`` (champion) to the ``mlflow.alias`` (challenger) version if it passes the gates.

    The decision and its reasons are recorded as tags on the challenger version (not in a dry run).
    """
    from deepfake_detector.tracking import alias_version, move_alias  # MLflow: only when promoting

    challenger = alias_version(p.mlflow, p.mlflow.alias)
    if challenger is None:
        raise UserError(f"no {p.mlflow.model_name}@{p.mlflow.alias} to promote: run the pipeline first")
    champion = alias_version(p.mlflow, p.promote.alias)
    if champion and champion[0] == challenger[0]:
        return {"version": challenger[0], "decision": "unchanged", "reasons": ["already the champion"]}
    passed, reasons = decide(challenger[1], champion[1] if champion else None, p.promote)
    decision = "promoted" if passed else ("forced" if force else "rejected")
    result = {"version": challenger[0], "champion_before": champion[0] if champion else None,
              "decision": decision, "reasons": reasons, "dry_run": dry_run}
    if not dry_run:
        tags = {"promotion.decision": decision, "promotion.reasons": "; ".join(reasons),
                "promotion.compared_with": champion[0] if champion else "none",
                "promotion.at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        move_alias(p.mlflow, p.promote.alias if decision != "rejected" else "", challenger[0], tags)
    return result
