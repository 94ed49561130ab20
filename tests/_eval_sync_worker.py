"""Worker of tests/test_eval_metrics.py::test_sync_over_gloo_equals_one_pass (spawned processes
import this small module only)."""
import json

import numpy as np


def data():
    rng = np.random.default_rng(11)
    a = (rng.standard_normal((50, 16)) * 2).astype(np.float32)
    b = (a + rng.standard_normal((50, 16))).astype(np.float32)
    return a, b, rng.integers(0, 16, 50)


def worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from kldiv.eval import DriftMetric

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        a, b, t = data()
        part = np.array_split(np.arange(50), world)[rank]
        m = DriftMetric(max_exact=30)  # the merged total crosses into the sketch regime
        m.update(a[part], b[part], tokens=t[part])
        m.sync()
        with open(f"{out_dir}/rank{rank}.json", "w") as fh:
            json.dump(m.state_dict(), fh)
    finally:
        dist.destroy_process_group()
