"""A LightningDataModule over a LLaVA-format instruction mix, with seeded nested fractions.

The loader is resumable: it reports how many batches of the current epoch were
consumed, Lightning stores that in its checkpoint, and after a restart the same
seeded order continues from the next batch, so a killed run resumes exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from harness.data.instruct import Collator, fraction_indices, load_mix


class _Records(Dataset):
    def __init__(self, ds, indices):
        self.ds, self.indices = ds, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.ds[self.indices[i]]


class ResumableLoader(DataLoader):
    """A shuffling DataLoader whose order depends only on (seed, epoch) and which can skip ahead."""

    def __init__(self, dataset, batch_size, collate_fn, seed: int, num_workers: int = 0):
        self.seed, self.epoch, self.consumed, self._skip = seed, 0, 0, 0
        super().__init__(dataset, batch_size=batch_size, collate_fn=collate_fn, num_workers=num_workers,
                         sampler=_EpochSampler(self), drop_last=False)

    def __iter__(self):
        self.consumed = self._skip
        for batch in super().__iter__():
            self.consumed += 1
            yield batch
        self._skip, self.consumed = 0, 0
        self.epoch += 1

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._skip = state["epoch"], state["consumed"]


class _EpochSampler(torch.utils.data.Sampler):
    def __init__(self, loader: ResumableLoader):
        self.loader = loader

    def __len__(self):
        return len(self.loader.dataset)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.loader.seed * 1000003 + self.loader.epoch)
        order = torch.randperm(len(self.loader.dataset), generator=g).tolist()
        return iter(order[self.loader._skip * self.loader.batch_size:])


class MixDataModule(pl.LightningDataModule):
    def __init__(self, mix_path: str | Path, processor, model_config, fraction: float = 1.0,
                 batch_size: int = 32, seed: int = 0, max_length: int = 512, num_workers: int = 0):
        super().__init__()
        self.mix_path = Path(mix_path)
        self.ds = load_mix(self.mix_path)
        root = self.mix_path if self.mix_path.is_dir() else self.mix_path.parent
        self.indices = fraction_indices(len(self.ds), fraction, seed)
        self.collator = Collator(processor, model_config, root, max_length)
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers

    @property
    def sample_ids(self) -> list[str]:
        ids = self.ds.select(self.indices)["id"] if "id" in self.ds.column_names else self.indices
        return [str(i) for i in ids]

    def steps_per_epoch(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def train_dataloader(self):
        return ResumableLoader(_Records(self.ds, self.indices), self.batch_size, self.collator, self.seed,
                               self.num_workers)
