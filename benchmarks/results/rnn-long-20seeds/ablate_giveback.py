"""rnn-long with the default guard but the give-back test switched off (an ablation).

Writes one JSON line per run (lr, seed, final held-out loss, rollbacks) for the LRs and
seeds of the 20-seed check in benchmarks/RESULTS.md:

    python benchmarks/results/rnn-long-20seeds/ablate_giveback.py OUT.jsonl
"""

from __future__ import annotations

import json
import math
import sys
from concurrent.futures import ProcessPoolExecutor

import torch


def job(a: tuple[float, int]) -> dict[str, float | int]:
    lr, seed = a
    torch.set_num_threads(1)
    import gradguard as gg
    from gradguard import scenarios as S
    from gradguard.control import Controller

    Controller.progress_threshold = lambda self: math.inf  # the give-back test off
    r = S.run("rnn-long", lr=lr, seed=seed,
              guard=lambda m, o, s=None: gg.Guard(m, o, scaler=s))
    return {"lr": lr, "seed": seed, "final": r.final_loss, "rollbacks": r.rollbacks}


if __name__ == "__main__":
    jobs = [(lr, s) for lr in (1e-3, 3e-3, 1e-2) for s in range(20)]
    with ProcessPoolExecutor(2) as ex, open(sys.argv[1], "w") as f:
        for r in ex.map(job, jobs):
            f.write(json.dumps(r) + "\n")
