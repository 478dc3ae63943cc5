"""Task arithmetic (Ilharco et al.): add the scaled sum of the task vectors to the base."""

from __future__ import annotations

from lightning_merge.methods import same_base as sb


class TaskArithmetic(sb.SameBaseMethod):
    """θ = θ₀ + λ Σᵢ (θᵢ − θ₀) on every parameter; buffers averaged.

    Without a base the reference θ₀ is the sources' mean, whose task vectors sum to zero: the
    result is then plain weight averaging whatever λ (λ = 1/N with a base is also the average).
    """

    name = "task_arithmetic"

    def __init__(self, scaling: float = 1.0) -> None:
        sb.check_scaling(scaling)
        self.scaling = float(scaling)

    def merge_parameters(self, inputs: sb.SameBaseInputs) -> sb.State:
        states, base_st = inputs.states, inputs.base
        if base_st is None:
            return {name: sb.average(states, name) for name in inputs.params}
        return {name: sb.task_arithmetic(states, base_st, name, self.scaling) for name in inputs.params}
