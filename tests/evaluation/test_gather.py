"""`gather_results` under DDP: 2 gloo processes, each with its DistributedSampler share of the samples,
get every record once, in the dataset's order (the sampler pads the last rank with repeats)."""
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

from bevfusion.evaluation.runner import gather_results


def _rank_main(rank, world, init_file, n, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sampler = DistributedSampler(list(range(n)), num_replicas=world, rank=rank, shuffle=False)
        records = [{"token": f"t{i}", "value": i * 10} for i in sampler]
        merged = {"sized": gather_results(records, size=n), "unsized": gather_results(records)}
        (out_dir / f"rank{rank}.json").write_text(json.dumps(merged))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("n", [5, 6])
def test_gather_results_restores_dataset_order_without_duplicates(tmp_path, n):
    world = 2
    mp.spawn(_rank_main, args=(world, str(tmp_path / "init"), n, tmp_path), nprocs=world, join=True)
    expected = [{"token": f"t{i}", "value": i * 10} for i in range(n)]
    for rank in range(world):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["sized"] == expected
        assert got["unsized"] == expected  # the padding repeat (n odd) is dropped, not just cut off


def test_gather_results_single_process_is_identity():
    records = [{"token": "b"}, {"token": "a"}]
    assert gather_results(records) is records
    assert torch.distributed.is_available()
