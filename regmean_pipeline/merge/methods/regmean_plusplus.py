"""RegMean++ (Nguyen et al., 2025): block by block, each block's Grams measured on the hidden states the
merged embeddings and merged blocks before it produce (plusplus/); it reads data, not caches."""

from __future__ import annotations

from dataclasses import dataclass

from regmean_pipeline.merge.methods.base import MergeDataParams, MergeMethod, Needs, param
from regmean_pipeline.merge.methods.regmean import SolveParams, solve_settings

PANEL = "RegMean++ (--method regmean++)"


@dataclass(frozen=True)
class RegMeanPlusPlusParams(SolveParams, MergeDataParams):
    activation_memory: str = param("4GiB", "Memory for all candidates' hidden states (on the GPU while it has room, "
                                   "else host memory); the rest is spilled to disk.", record=False, panel=PANEL)
    spill_dir: str | None = param(None, "Local folder for spilled hidden states (default: the system's temporary "
                                  "folder).", record=False, panel=PANEL)
    checkpoint_every: int = param(0, "Checkpoint the merged blocks every N blocks (beside OUT, in "
                                  ".OUT.checkpoint/); 0: never.", low=0, record=False, panel=PANEL)
    resume: bool = param(False, "Continue from the checkpoint a killed regmean++ run left (same inputs and "
                         "options).", flag="--resume", record=False, panel=PANEL)


METHOD = MergeMethod(
    name="regmean++",
    title="RegMean++ ([Nguyen et al., 2025](https://arxiv.org/abs/2508.03121)): block by block, each block's "
          "linear layers solved in closed form from Grams measured on the hidden states the merged embeddings "
          "and merged blocks before it produce",
    help="block by block on the merged model's own activations: --model NAME=PATH --dataset NAME=PATH, no caches",
    params=RegMeanPlusPlusParams,
    needs=Needs(data=True),
    solve=solve_settings,
)
