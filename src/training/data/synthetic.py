"""Random image–caption pairs for smoke tests and throughput measurements (no files needed)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..config import DataConfig
from .common import DataInfo, DataTransforms, collate, make_sample, sample_rng
from .csv import GlobalBatchSampler

_WORDS = ["red", "green", "blue", "small", "large", "circle", "square", "photo", "of", "a", "dog", "cat", "tree"]


class SyntheticDataset(Dataset):
    def __init__(self, num_samples: int, transforms: DataTransforms, is_train: bool, image_size: int = 224,
                 seed: int = 0):
        self.num_samples, self.transforms, self.is_train = num_samples, transforms, is_train
        self.image_size, self.seed = image_size, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, item) -> dict:
        idx, epoch = item if isinstance(item, tuple) else (item, 0)
        gen = np.random.default_rng([self.seed, idx])
        pixels = gen.integers(0, 256, size=(self.image_size, self.image_size, 3), dtype=np.uint8)
        caption = " ".join(gen.choice(_WORDS, size=6))
        key = f"synthetic/{idx}"
        sample = make_sample(Image.fromarray(pixels), caption, key, self.transforms, self.is_train,
                             sample_rng(self.seed, epoch, key))
        sample["skipped"] = {}
        return sample


def get_synthetic_dataset(data: DataConfig, transforms: DataTransforms, *, seed: int, is_train: bool = True,
                          epoch: int = 0, image_size: int = 224) -> DataInfo:
    from ..distributed import world_info

    dataset = SyntheticDataset(data.synthetic_num_samples, transforms, is_train, image_size, seed=seed)
    rank, world_size = world_info()
    sampler = GlobalBatchSampler(len(dataset), data.batch_size, rank, world_size, seed, shuffle=is_train,
                                 num_samples=data.train_num_samples if is_train else None)
    sampler.set_epoch(epoch)
    loader = DataLoader(dataset, batch_size=data.batch_size, sampler=sampler, num_workers=data.workers,
                        collate_fn=collate, pin_memory=torch.cuda.is_available(), drop_last=True)
    return DataInfo(dataloader=loader, num_batches=sampler.num_batches,
                    num_samples=sampler.num_batches * data.batch_size * world_size, set_epoch_fn=sampler.set_epoch)
