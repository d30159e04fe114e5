"""A LightningDataModule over a LLaVA-format instruction mix, with seeded nested fractions.

The loader is resumable: it reports how many batches of the current epoch were
consumed, Lightning stores that in its checkpoint, and after a restart the same
seeded order continues from the next batch, so a killed run resumes exactly.

`batch_size` is the global batch. Under DDP each of the N processes takes its own
contiguous 1/N slice of every global batch of the same seeded order (the split is
done here, so the Trainer runs with `use_distributed_sampler=False`): N processes
see exactly the batches one process would, and rank r's micro-batch k is
micro-batch r of global batch k, as under gradient accumulation.

With `group_by_length` (LLaVA's `group_by_modality_length`, HF's `LengthGroupedSampler`)
each run of `GROUP_BATCHES` global batches of the shuffled order is sorted by text
length before being cut into batches, whose order within the run is then shuffled:
batches pad far less (on the synthetic mix 57% of a random batch's tokens are real,
over 90% of a grouped one's) while the epoch stays a seeded permutation.
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from harness.data.instruct import Collator, fraction_indices, load_mix
from harness.errors import HarnessError

GROUP_BATCHES = 32  # global batches per length-sorted run


class _Records(Dataset):
    def __init__(self, ds, indices):
        self.ds, self.indices = ds, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.ds[self.indices[i]]


class ResumableLoader(DataLoader):
    """A shuffling DataLoader whose order depends only on (seed, epoch) and which can skip ahead.

    Its position is (epoch, batches of it consumed). An iteration deals from that position to
    the end of the epoch, and handing out an epoch's last batch moves the position to the start
    of the next epoch then, not when the iterator is exhausted: Lightning knows the length and
    never asks past the last batch, so an epoch counted only on exhaustion never advanced (every
    epoch repeated epoch 0's order, and a resumed run kept skipping the resumed epoch's consumed
    batches in every later epoch).
    """

    def __init__(self, dataset, batch_size, collate_fn, seed: int, num_workers: int = 0, rank: int = 0,
                 world_size: int = 1, lengths: list[int] | None = None):
        self.seed, self.epoch, self.consumed = seed, 0, 0
        self._start = (0, 0)  # the position the current iteration deals from (read by the sampler)
        self.rank, self.world_size = rank, world_size  # batch_size is per process
        self.lengths = lengths  # per-record lengths: group batches by length when given
        # Its own generator: DataLoader draws every epoch's worker base seed from it (from the global
        # RNG without one, even with no workers), seeded per epoch below like the sampler's order.
        super().__init__(dataset, batch_size=batch_size, collate_fn=collate_fn, num_workers=num_workers,
                         sampler=_EpochSampler(self), drop_last=False, generator=torch.Generator())

    def __iter__(self):
        per_epoch = len(self)
        if self.consumed >= per_epoch:  # a position saved after an epoch's last batch by an older version
            self.epoch, self.consumed = self.epoch + 1, 0
        self._start = (self.epoch, self.consumed)
        self.generator.manual_seed(_epoch_seed(self.seed, self.epoch) + 1)
        for batch in super().__iter__():
            self.consumed += 1
            if self.consumed >= per_epoch:
                self.epoch, self.consumed = self.epoch + 1, 0
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed = state["epoch"], state["consumed"]


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1000003 + epoch


class _EpochSampler(torch.utils.data.Sampler):
    def __init__(self, loader: ResumableLoader):
        self.loader = loader

    def __len__(self):
        return -(-len(self.loader.dataset) // self.loader.world_size)

    def __iter__(self):
        loader = self.loader
        epoch, skip = loader._start
        g = torch.Generator().manual_seed(_epoch_seed(loader.seed, epoch))
        order = torch.randperm(len(loader.dataset), generator=g).tolist()
        n = loader.world_size
        if loader.lengths is not None:
            order = _group_by_length(order, loader.lengths, loader.batch_size * n, g)
        if n > 1:  # this rank's slice of every global batch; the last one is padded from the start, as DistributedSampler does
            order += (order * n)[: -len(order) % n]
            step = loader.batch_size * n
            mine = []
            for start in range(0, len(order), step):
                chunk = order[start:start + step]
                share = len(chunk) // n
                mine += chunk[loader.rank * share:(loader.rank + 1) * share]
            order = mine
        return iter(order[skip * loader.batch_size:])


def _group_by_length(order: list[int], lengths: list[int], batch: int, g: torch.Generator) -> list[int]:
    """Sort each run of GROUP_BATCHES batches by length (longest first) and shuffle its full batches.

    Batch boundaries stay at multiples of `batch`, so the DDP split and resume see whole batches;
    a final partial batch stays last.
    """
    grouped = []
    run = batch * GROUP_BATCHES
    for start in range(0, len(order), run):
        chunk = sorted(order[start:start + run], key=lambda i: -lengths[i])
        batches = [chunk[k:k + batch] for k in range(0, len(chunk), batch)]
        full = [b for b in batches if len(b) == batch]
        for k in torch.randperm(len(full), generator=g).tolist():
            grouped += full[k]
        grouped += [i for b in batches if len(b) < batch for i in b]
    return grouped


def text_lengths(ds) -> list[int]:
    """Characters of every turn: a cheap proxy for the token count, as LLaVA's `lengths` is for words."""
    return [sum(len(turn["value"]) for turn in conv) for conv in ds["conversations"]]


class MixDataModule(pl.LightningDataModule):
    def __init__(self, mix_path: str | Path, processor, model_config, fraction: float = 1.0,
                 batch_size: int = 32, seed: int = 0, max_length: int = 512, num_workers: int = 0,
                 group_by_length: bool = False, val_path: str | Path | None = None):
        super().__init__()
        self.mix_path = Path(mix_path)
        self.ds = load_mix(self.mix_path)
        self.val_ds = load_mix(val_path) if val_path is not None else None
        root = self.mix_path if self.mix_path.is_dir() else self.mix_path.parent
        self.indices = fraction_indices(len(self.ds), fraction, seed)
        self.collator = Collator(processor, model_config, root, max_length)
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.lengths = None
        if group_by_length:
            every = text_lengths(self.ds)
            self.lengths = [every[i] for i in self.indices]

    @property
    def sample_ids(self) -> list[str]:
        ids = self.ds.select(self.indices)["id"] if "id" in self.ds.column_names else self.indices
        return [str(i) for i in ids]

    def steps_per_epoch(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def train_dataloader(self):
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if self.batch_size % world:
            raise HarnessError(f"batch size {self.batch_size} is the global batch: it must divide evenly over {world} processes")
        return ResumableLoader(_Records(self.ds, self.indices), self.batch_size // world, self.collator, self.seed,
                               self.num_workers, rank=rank, world_size=world, lengths=self.lengths)

    def val_dataloader(self):
        """The whole held-out split in file order, on every process (the logged means are then the same)."""
        if self.val_ds is None:
            return []
        world = self.trainer.world_size if self.trainer is not None else 1
        return DataLoader(_Records(self.val_ds, list(range(len(self.val_ds)))), batch_size=self.batch_size // world,
                          collate_fn=self.collator, shuffle=False, generator=torch.Generator())


def val_split_of(mix_path: str | Path) -> Path | None:
    """The held-out split that goes with a mix: `val.json` in the mix's folder, if there is one."""
    path = Path(mix_path)
    val = (path if path.is_dir() else path.parent) / "val.json"
    return val if val.exists() else None
