"""Task arithmetic (Ilharco et al., 2023): theta = theta_pre + lambda * sum_i c_i (theta_i - theta_pre)."""

from __future__ import annotations

from dataclasses import dataclass

from regmean_pipeline.merge.methods.base import MergeMethod, MethodInputs, Needs, TensorCombiner
from regmean_pipeline.merge.methods.task_vectors import Recipe, TaskVectorMerge, scaling_param


@dataclass(frozen=True)
class TaskArithmeticParams:
    scaling: float = scaling_param(0.3)


def combiner(inputs: MethodInputs, params: TaskArithmeticParams) -> TensorCombiner:
    return TaskVectorMerge(inputs, Recipe(scaling=params.scaling))


METHOD = MergeMethod(
    name="task-arithmetic",
    title="task arithmetic ([Ilharco et al., 2023](https://arxiv.org/abs/2212.04089)): the pretrained model "
          "plus the scaled sum of the candidates' task vectors",
    help="--pretrained plus --scaling times the summed task vectors; no caches needed",
    params=TaskArithmeticParams,
    needs=Needs(pretrained=True),
    combiner=combiner,
    identity=lambda copies: {"scaling": 1 / copies},
)
