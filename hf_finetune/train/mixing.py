"""MixUp and CutMix on training batches (torchvision.transforms.v2), with the soft targets they give.

MixUp blends two pictures and their labels with a weight drawn from Beta(alpha, alpha); CutMix pastes a box
of one picture into another, the labels weighted by the box's area. With both on, each batch gets one of the
two (`switch_prob` is the chance of CutMix), as timm's `Mixup` does; `mix_prob` is the chance that a batch is
mixed at all. The labels become a probability row per picture, which `hf_finetune.train.losses` takes.

Why the mixing happens in the training step and not in the DataLoader's collate function: v2's MixUp and
CutMix draw from torch's default generator. In the training step (main process, after
`hf_finetune.train.resume.StepSeedCallback` has seeded that generator from the seed and the step) the draws
are a function of the step, so a resumed run mixes exactly as the uninterrupted one did, whatever the number
of dataloader workers. Evaluation batches are never mixed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MixingSettings:
    mixup_alpha: float = 0.0  # 0 = off; DeiT's fine-tuning uses 0.8
    cutmix_alpha: float = 0.0  # 0 = off; DeiT uses 1.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5  # with both on: the chance that a batch gets CutMix rather than MixUp

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


class BatchMixing:
    """Mixes a batch's `pixel_values` and turns its `labels` into soft targets (float, batch x classes)."""

    def __init__(self, settings: MixingSettings, num_labels: int):
        # The values were checked where users give them (FinetuneTrainingArguments).
        self.settings = settings
        self.num_labels = int(num_labels)
        self._mixup = self._cutmix = None
        if settings.enabled:
            from torchvision.transforms import v2

            if settings.mixup_alpha > 0:
                self._mixup = v2.MixUp(alpha=settings.mixup_alpha, num_classes=self.num_labels)
            if settings.cutmix_alpha > 0:
                self._cutmix = v2.CutMix(alpha=settings.cutmix_alpha, num_classes=self.num_labels)

    def __call__(self, batch: dict) -> dict:
        import torch

        if not self.settings.enabled or "labels" not in batch:
            return batch
        pixels, labels = batch["pixel_values"], batch["labels"]
        # Every draw comes from torch's default generator, in a fixed order (see the module docstring).
        mixed = torch.rand(()).item() < self.settings.mix_prob
        use_cutmix = self._cutmix is not None and (
            self._mixup is None or torch.rand(()).item() < self.settings.switch_prob
        )
        if labels.is_floating_point():  # multi-hot rows (multi-label data; CutMix is refused for it)
            if not mixed:
                return batch
            # MixUp as torchvision does it (each picture with the batch rolled by one, one weight per batch),
            # on the 0/1 rows directly: the mixed picture shows each label in proportion.
            lam = (
                torch.distributions.Beta(self.settings.mixup_alpha, self.settings.mixup_alpha).sample().item()
            )
            return {
                **batch,
                "pixel_values": pixels.roll(1, 0).mul_(1.0 - lam).add_(pixels.mul(lam)),
                "labels": labels.roll(1, 0).mul_(1.0 - lam).add_(labels.mul(lam)),
            }
        if not mixed:
            soft = torch.nn.functional.one_hot(labels, self.num_labels).float()
            return {**batch, "labels": soft}
        transform = self._cutmix if use_cutmix else self._mixup
        memory_format = (
            torch.channels_last if pixels.is_contiguous(memory_format=torch.channels_last) else None
        )
        out_pixels, out_labels = transform(pixels, labels)
        if memory_format is not None and pixels.dim() == 4:
            out_pixels = out_pixels.contiguous(memory_format=memory_format)
        return {**batch, "pixel_values": out_pixels, "labels": out_labels.float()}


class MixingTrainerMixin:
    """Trainer mixin: training batches pass through `batch_mixing` (a `BatchMixing`, or None) in the step."""

    batch_mixing = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.batch_mixing is not None and model.training:
            inputs = self.batch_mixing(inputs)
        return super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
