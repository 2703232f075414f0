"""Read LitData streams through ImageNetDataModule on 2 CPU processes (gloo); each rank writes the sample
indices it saw per epoch (run by tests/datamodules/test_streaming.py)."""

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from datamodules import ImageNetDataModule


class SampleIndex:
    """Stands in for the decode + albumentations step: the sample's index as a (1,) tensor, and its label."""

    def set_random_seed(self, seed: int) -> None:  # called by seed_worker, like the real transform
        pass

    def __call__(self, item: dict) -> tuple[torch.Tensor, int]:
        return torch.tensor([item["index"]]), int(item["label"])


def run(rank: int, stream_dir: str, out_dir: str, configs: list[tuple[int, int]], port: int) -> None:
    # a spawned child inherits the "spawn" start method; fork the DataLoader workers, as they are under
    # Lightning's DDP launcher (which starts ranks as plain scripts), instead of re-importing everything
    mp.set_start_method("fork", force=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    for num_workers, batch_size in configs:
        dm = ImageNetDataModule(
            stream_dir=stream_dir, image_size=8, resize=8, batch_size=batch_size, num_workers=num_workers
        )
        dm.setup("fit")  # after init_process_group, as under a Trainer
        dm.train_set.transform = SampleIndex()
        dm.val_set.transform = SampleIndex()
        report = {"rank": rank, "train": [], "train_batch_sizes": [], "val": []}
        train, val = dm.train_dataloader(), dm.val_dataloader()
        report["train_len"] = len(train)
        for _ in range(2):  # two epochs through the same (persistent-worker) loaders
            batches = [b[0][:, 0].tolist() for b in train]
            report["train"].append([i for b in batches for i in b])
            report["train_batch_sizes"].append([len(b) for b in batches])
            report["val"].append([i for b in val for i in b[0][:, 0].tolist()])
        with open(os.path.join(out_dir, f"w{num_workers}_b{batch_size}_rank{rank}.json"), "w") as f:
            json.dump(report, f)
        del train, val  # shut the persistent workers down before the next configuration
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    # usage: stream_ddp.py STREAM_DIR OUT_DIR PORT WORKERS:BATCH [WORKERS:BATCH ...]
    stream_dir, out_dir, port = sys.argv[1:4]
    configs = [tuple(int(v) for v in c.split(":")) for c in sys.argv[4:]]
    mp.spawn(run, args=(stream_dir, out_dir, configs, int(port)), nprocs=2)
