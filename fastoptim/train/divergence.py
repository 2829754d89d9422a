"""The study's divergence rule and final-loss definition (benchmark-spec §4), judged on the eval-loss history.

Divergence: a run diverged when one of its evaluations gives a loss that is NaN or infinite, a loss above 1e4, or,
at a step after 2000, a loss of 6 or more. The study's code applies it to the evaluation losses (a training loss
that spikes once and recovers does not count). The trainer evaluates every `eval_every` steps and at the end, and at
once on a log step whose training loss is not finite (its parameters are gone by then; the rule fires at that
evaluation instead of up to eval_every steps later). A run stops at the evaluation where the rule fires and records
the rule in words as `diverged_reason`.

Final loss: the evaluation at the end of training, on the fixed eval set (the study's `eval/paloma/c4_en/loss` at
the last step); every selection and speedup uses it. A diverged run's final loss is inf: it is finished, and loses
to every run that did not diverge.
"""

import math

MAX_LOSS = 1e4
LATE_LOSS, LATE_STEP = 6.0, 2000


def divergence_reason(step: int, val_loss: float) -> str | None:
    """The rule an evaluation at `step` (optimizer steps done) with `val_loss` fires, in words; None if none."""
    if math.isnan(val_loss):
        return f"eval loss NaN at step {step}"
    if math.isinf(val_loss):
        return f"eval loss inf at step {step}"
    if val_loss > MAX_LOSS:
        return f"eval loss {val_loss:.4g} > 1e4 at step {step}"
    if step > LATE_STEP and val_loss >= LATE_LOSS:
        return f"eval loss {val_loss:.2f} ≥ 6 after step {LATE_STEP} (at step {step})"
    return None
