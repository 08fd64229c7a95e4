"""The batch order, shared by the cached and per-file paths so both see identical batches."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler

BATCHINGS = ("per_directory", "random")  # fidelity.batching for training; "sequential": val/test


class DirectoryBatchSampler(Sampler[list[int]]):
    """Keras's batching of concatenated directories (mode="per_directory"): each directory is
    shuffled and cut into batches, keeping its last partial batch, then the batches are shuffled.
    4 directories of 10,000 at batch 64 give 4 x 157 = 628 steps. mode="random" is one permutation
    of everything (625 steps); mode="sequential" keeps file order (validation, test).

    Each epoch reshuffles from (seed, epoch); fixed=True keeps epoch 0's order every epoch (what
    trainer.overfit_batches needs: the same first batches each time). With world_size > 1 (DDP)
    every batch is split into world_size contiguous chunks and each rank takes its own:
    data.batch_size stays the global batch, every rank takes the same number of steps, and each
    image is seen once per epoch. DDP averages the ranks' gradients, which equals the
    single-process step when chunks are equal.

    mirror=True (augment.alternating_flip) yields (index, mirrored) pairs instead of indices, for
    MirroredImages: a random half of the images, fixed by the seed, is mirrored in even epochs
    (0, 2, ...) and the other half in odd ones, so each image is seen both ways every two epochs
    (airbench's alternating flip, arXiv:2404.00498). Being a function of (seed, epoch), it resumes
    like the batch order."""

    def __init__(
        self,
        sizes: list[int],
        batch_size: int,
        mode: str = "per_directory",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        fixed: bool = False,
        mirror: bool = False,
    ):
        if mode not in (*BATCHINGS, "sequential"):
            raise ValueError(f"unknown batching mode {mode!r}")
        self.sizes, self.batch_size, self.mode, self.seed = list(sizes), batch_size, mode, seed
        self.rank, self.world_size, self.epoch, self.fixed = rank, world_size, 0, fixed
        self.mirror = mirror
        # Lightning calls set_epoch(current_epoch) on `batch_sampler.sampler` before each epoch
        # (also after a resume); we are our own sampler, so the order follows the epoch number.
        self.sampler = self

    def set_epoch(self, epoch: int) -> None:
        if not self.fixed:
            self.epoch = epoch

    def batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        total = sum(self.sizes)
        if self.mode == "sequential":
            order = [torch.arange(total)]
        elif self.mode == "random":
            order = [torch.randperm(total, generator=g)]
        else:
            starts = torch.tensor([0] + self.sizes).cumsum(0).tolist()
            order = [starts[i] + torch.randperm(n, generator=g) for i, n in enumerate(self.sizes)]
        batches = [b.tolist() for idx in order for b in idx.split(self.batch_size)]
        if self.mode != "sequential":
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        if self.mirror:
            mirrored = self.mirrored(total).tolist()
            batches = [[(i, mirrored[i]) for i in b] for b in batches]
        if self.world_size > 1:
            batches = [self._chunk(b) for b in batches]
        return batches

    def mirrored(self, total: int) -> torch.Tensor:
        """Which of the `total` images this epoch mirrors (bool): the seed's random half in even
        epochs, the other half in odd ones."""
        first = torch.Generator().manual_seed(self.seed * 1_000_003 - 1)  # not an epoch's stream
        half = torch.rand(total, generator=first) < 0.5
        return half if self.epoch % 2 == 0 else ~half

    def _chunk(self, batch: list[int]) -> list[int]:
        n, w, r = len(batch), self.world_size, self.rank
        if n < w:
            # Every rank must take a step: ranks past the batch repeat its last image, so the
            # repeats come last when the ranks' chunks are put together.
            return [batch[min(r, n - 1)]]
        return batch[r * n // w : (r + 1) * n // w]

    def __iter__(self):
        yield from self.batches()

    def __len__(self) -> int:
        if self.mode == "random" or self.mode == "sequential":
            n = -(-sum(self.sizes) // self.batch_size)
        else:
            n = sum(-(-s // self.batch_size) for s in self.sizes)
        return n
