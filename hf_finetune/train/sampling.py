"""The balanced training sampler (`sampler: balanced`): every class drawn equally often, exactly resumable.

torch's `WeightedRandomSampler` with each picture weighted 1 / (its class's count) draws, with replacement, as
many pictures per epoch as the training split holds, so that each class fills about 1 / k of every epoch:
rare classes are seen repeatedly, frequent ones partly. It is the sampling counterpart of `class_weights:
auto` (which reweighs the loss instead); use one or the other, not both, or rare classes count twice over.

Exact resume: the sampler's generator is seeded from (seed, epoch) each time the Trainer sets the epoch
(transformers and accelerate call `set_epoch` on the sampler before each epoch's batches, also after skipping
the batches a resumed epoch has already trained on), so an epoch's draw never depends on what was drawn
before, and every process draws the same permutation (accelerate then gives each process its shard).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from torch.utils.data import WeightedRandomSampler

from hf_finetune.compat import TrainerSamplerHook
from hf_finetune.data.transforms import derived_seed

SAMPLER_STREAM = 2  # first word after the seed (resume's steps use 0, the augmentation 1)


def balanced_weights(label_ids: Sequence[int]) -> list[float]:
    """Each picture's sampling weight: 1 / (the number of training pictures of its class)."""
    counts = Counter(int(label) for label in label_ids)
    return [1.0 / counts[int(label)] for label in label_ids]


class BalancedSampler(WeightedRandomSampler):
    """`WeightedRandomSampler` over class-balanced weights whose draw is a function of (seed, epoch) only."""

    def __init__(self, label_ids: Sequence[int], seed: int):
        super().__init__(balanced_weights(label_ids), num_samples=len(label_ids), replacement=True)
        self.seed = int(seed)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.generator = torch.Generator().manual_seed(derived_seed(self.seed, SAMPLER_STREAM, self.epoch))

    def __iter__(self):
        # Seeded again at each pass, so iterating an epoch twice (a resumed epoch) draws the same pictures.
        self.set_epoch(self.epoch)
        return super().__iter__()


class BalancedSamplerMixin(TrainerSamplerHook):
    """Trainer mixin (`hf_finetune.compat.TrainerSamplerHook` reaches it): with `balanced_label_ids` set,
    the training sampler is a `BalancedSampler` over them."""

    balanced_label_ids: Sequence[int] | None = None

    def train_sampler(self, train_dataset=None):
        if self.balanced_label_ids is None:
            return super().train_sampler(train_dataset)
        return BalancedSampler(self.balanced_label_ids, self.args.seed)
