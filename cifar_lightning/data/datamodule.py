"""The LightningDataModule: prepare the layout, check classes across splits, serve batches.

Two paths, identical batches (same DirectoryBatchSampler):
  cache=true   decode each split once into a uint8 tensor (CPU, or GPU memory when training on
               one); batches are gathered by index, no worker processes. For data that fits in
               memory.
  cache=false  torchvision ImageFolder + DataLoader workers decode with PIL every epoch. For data
               that does not fit in memory.
Both yield uint8 images; the network does the 1/255 rescaling."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from tqdm import tqdm

from cifar_lightning.data.cache import load_split, warn_skipped
from cifar_lightning.data.folder import KerasImageFolder, check_same_classes, require_classes
from cifar_lightning.data.prepare import ensure_layout
from cifar_lightning.data.sampler import DirectoryBatchSampler
from cifar_lightning.errors import UserError


class TensorImages(Dataset):
    """Images and labels in two tensors; DataLoader fetches a whole batch with one gather."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def __getitems__(self, indices):
        idx = torch.as_tensor(indices)
        if self.images.is_cuda:
            # A plain copy to the GPU waits for every queued kernel (a host-GPU sync per batch), so
            # the host could not queue step n+1 while the GPU runs step n. Pinned + non_blocking
            # does not wait.
            idx = idx.pin_memory().to(self.images.device, non_blocking=True)
        return self.images[idx], self.labels[idx]


class MirroredImages(Dataset):
    """Training images mirrored as the batch sampler decides (augment.alternating_flip): it is
    indexed by the sampler's (index, mirrored) pairs."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, item):
        i, mirrored = item
        image, label = self.base[i]
        return (image.flip(-1) if mirrored else image), label

    def __getitems__(self, items):
        if not isinstance(self.base, TensorImages):
            return [self[item] for item in items]  # one sample each, for the default collate
        images, labels = self.base.__getitems__([i for i, _ in items])
        mirrored = torch.tensor([m for _, m in items], device=images.device)
        return torch.where(mirrored[:, None, None, None], images.flip(-1), images), labels


def _whole_batch(batch):
    return batch


def eval_batch_size(setting, batch_size: int, device: torch.device) -> int:
    """data.eval_batch_size: auto is batch_size on the CPU, where Model S evaluates fastest at 64,
    and 1024 on a GPU, where batches of 64 are launch-bound (16x the launches for the same images).
    Validation and test metrics are per-image means, so the size changes them only by float
    rounding."""
    if setting == "auto":
        return max(batch_size, 1024) if device.type == "cuda" else batch_size
    return int(setting)


class CifarDataModule(L.LightningDataModule):
    def __init__(
        self,
        root: str,
        source: str = "download",
        train_dirs=("train_1", "train_2", "train_3", "train_4"),
        val_dir: str = "valid",
        test_dir: str = "test",
        batch_size: int = 64,
        image_size: int = 32,
        cache: bool = True,
        num_workers: int = 0,
        skip_bad_files: bool = False,
        batching: str = "per_directory",
        resize: str = "tf_bilinear",
        seed: int = 0,
        eval_batch_size: int | str = "auto",
        alternating_flip: bool = False,
    ):
        super().__init__()
        # how images are decoded goes into every checkpoint, so evaluate and predict decode theirs
        # the same way (checkpoint.image_rule)
        self.save_hyperparameters("image_size", "resize", logger=False)
        self.root, self.source = Path(root), source
        self.train_dirs, self.val_dir, self.test_dir = list(train_dirs), val_dir, test_dir
        self.batch_size, self.image_size, self.cache = batch_size, image_size, cache
        self.num_workers, self.skip_bad_files = num_workers, skip_bad_files
        self.batching, self.resize, self.seed = batching, resize, seed
        self.eval_batch_size, self.alternating_flip = eval_batch_size, alternating_flip
        self.classes: list[str] | None = None
        # role -> (dataset, size of each directory)
        self._data: dict[str, tuple[Dataset, list[int]]] = {}
        self.paths: dict[str, list[str]] = {}  # per split, in loader order (for predictions.csv)

    @property
    def split_names(self) -> list[str]:
        return [*self.train_dirs, self.val_dir, self.test_dir]

    def prepare_data(self):
        ensure_layout(self.root, self.source, self.split_names)

    def class_names(self) -> list[str]:
        """The class folders of the first train directory, by Keras's rule (folder.find_classes;
        none at all is an error): what the model's outputs are sized and named by. Call it after
        prepare_data(), before the model is built; it decodes nothing. setup() then checks that
        every split has these same folders."""
        return require_classes(self.root / self.train_dirs[0])

    def _folder(self, name: str) -> KerasImageFolder:
        return KerasImageFolder(self.root / name, self.image_size, self.resize, self.skip_bad_files)

    def setup(self, stage: str | None = None):
        if self._data:
            return
        folders = {name: self._folder(name) for name in self.split_names}
        self.classes = check_same_classes({n: f.classes for n, f in folders.items()})
        device = self._batch_device()
        splits = {}
        for name, folder in folders.items():
            if self.cache:
                images, labels, self.paths[name] = load_split(folder, self.image_size, self.resize)
                splits[name] = TensorImages(images, labels)
            else:
                splits[name] = check_images(folder)
                self.paths[name] = [p for p, _ in folder.samples]
        # Built once per role: the train directories are concatenated here, not in every
        # train_dataloader() call, and the cached tensors exist once (on the GPU when training
        # there).
        for role, names in (
            ("train", self.train_dirs),
            ("val", [self.val_dir]),
            ("test", [self.test_dir]),
        ):
            parts = [splits[n] for n in names]
            if self.cache:
                dataset = TensorImages(
                    torch.cat([d.images for d in parts]).to(device),
                    torch.cat([d.labels for d in parts]).to(device),
                )
            else:
                dataset = parts[0] if len(parts) == 1 else ConcatDataset(parts)
            self._data[role] = (dataset, [len(d) for d in parts])

    def first_train_images(self, count: int) -> torch.Tensor:
        """`count` training images evenly spaced over all the train directories, in their order
        (no random numbers), uint8 N x C x H x W: the sample a data-dependent initialisation
        reads. Each directory is sorted by class, so its first images would be a few classes
        only."""
        dataset, _ = self._data["train"]
        count = min(count, len(dataset))
        index = torch.linspace(0, len(dataset) - 1, count, dtype=torch.float64).long()
        if isinstance(dataset, TensorImages):
            return dataset.images[index.to(dataset.images.device)]
        return torch.stack([torch.as_tensor(dataset[i][0]) for i in index.tolist()])

    def _batch_device(self) -> torch.device:
        """The GPU the trainer runs on, else the CPU: where cached tensors live and batches go."""
        trainer = getattr(self, "trainer", None)
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        return device if device.type == "cuda" else torch.device("cpu")

    def _loader(self, role: str, mode: str) -> DataLoader:
        dataset, sizes = self._data[role]
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        batch_size = (
            self.batch_size
            if role == "train"
            else eval_batch_size(self.eval_batch_size, self.batch_size, self._batch_device())
        )
        # trainer.overfit_batches: Lightning swaps a shuffling sampler for a sequential one, so
        # that every epoch trains on the same first batches; it does not look into a custom
        # batch_sampler (ours shuffles per epoch), so the order is fixed here instead.
        fixed = role == "train" and getattr(trainer, "overfit_batches", 0) > 0
        mirror = role == "train" and self.alternating_flip
        sampler = DirectoryBatchSampler(
            sizes, batch_size, mode, self.seed, rank, world, fixed, mirror
        )
        if mirror:
            dataset = MirroredImages(dataset)
        if self.cache:
            return DataLoader(
                dataset, batch_sampler=sampler, collate_fn=_whole_batch, num_workers=0
            )
        # Pinned batches let Lightning's copy to the GPU (non_blocking) run without the host
        # waiting.
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self._batch_device().type == "cuda",
        )

    def train_dataloader(self):
        return self._loader("train", self.batching)

    def val_dataloader(self):
        return self._loader("val", "sequential")

    def test_dataloader(self):
        return self._loader("test", "sequential")


def check_images(folder: KerasImageFolder) -> KerasImageFolder:
    """Per-file path: decode each file once at setup, so a bad file is found now and not halfway
    through epoch 7. It is an error, or with skip_bad_files dropped with a warning."""
    bad = []
    with tqdm(
        folder.samples, desc=f"checking {Path(folder.root).name}", unit="img", mininterval=1.0
    ) as samples:
        for path, _ in samples:  # the bar is closed before an error line
            try:
                folder.loader(path)
            except UserError as exc:
                if not folder.skip_bad_files:
                    raise
                bad.append((path, str(exc)))
    if bad:
        paths = {p for p, _ in bad}
        folder.samples = [s for s in folder.samples if s[0] not in paths]
        folder.targets = [t for _, t in folder.samples]
        folder.imgs = folder.samples
        warn_skipped(Path(folder.root), [m for _, m in bad])
    return folder
