"""Small torch heads trained on the cached features: `linear` (one Linear) and `mlp` (one GELU hidden layer).

`TorchHead` is the training loop as a scikit-learn classifier, so the weight decay is chosen on validation
by the same `GridSearchCV` search as every other probe classifier (see `search.py`; the `linear` and `mlp`
entries of `classifiers.CLASSIFIERS` build it). Imported only when a head is fitted: it subclasses
scikit-learn's estimator classes, which take seconds to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sklearn.base import BaseEstimator, ClassifierMixin

if TYPE_CHECKING:
    from hf_finetune.probe.predictors import Predictor

# Multiply-adds per step (batch x widest weight matrix) under which a CPU head trains single-threaded.
SINGLE_THREAD_BELOW = 2**24


class TorchHead(ClassifierMixin, BaseEstimator):  # scikit-learn wants its mixins first
    """A torch head trained for `epochs` (AdamW, cosine schedule, cross-entropy) on feature rows.

    After `fit`, `predictor_` is the head as plain arrays (what is saved) and predicts every label id in
    `range(num_labels)`, seen in training or not.
    """

    def __init__(
        self,
        kind: str = "linear",
        num_labels: int = 2,
        weight_decay: float = 0.0,
        epochs: int = 10,
        learning_rate: float = 0.03,
        batch_size: int = 64,
        hidden_size: int = 256,
        dropout: float = 0.2,
        seed: int = 0,
        device: str = "cpu",
    ):
        self.kind = kind
        self.num_labels = num_labels
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.hidden_size = hidden_size
        self.dropout = dropout
        self.seed = seed
        self.device = device

    def _build(self, dim: int):
        from torch import nn

        from hf_finetune.probe.predictors import build_mlp

        if self.kind == "linear":
            return nn.Linear(dim, self.num_labels)
        return build_mlp(dim, self.hidden_size, self.num_labels, self.dropout)

    def fit(self, x, y):
        """Seeded before the head is built, so the result does not depend on what consumed random numbers
        earlier in the run (a cold run loads a model first, a warm one does not)."""
        import numpy as np
        import torch

        from hf_finetune.probe.predictors import LinearPredictor, MLPPredictor

        torch.manual_seed(self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        net = self._build(x.shape[1])
        widest = max(m.weight.numel() for m in net.modules() if isinstance(m, torch.nn.Linear))
        threads = torch.get_num_threads()
        if str(self.device).startswith("cpu") and self.batch_size * widest < SINGLE_THREAD_BELOW:
            # A small head's matrix products are too small to split across threads: on a busy machine the
            # waiting for the other threads costs several times the work (measured: 0.5 s vs 5 s for an MLP).
            torch.set_num_threads(1)
        try:
            net = self._train(net, np.ascontiguousarray(x), np.asarray(y), generator)
        finally:
            torch.set_num_threads(threads)
        if self.kind == "linear":
            self.predictor_: Predictor = LinearPredictor(
                net.weight.detach().double().numpy(), net.bias.detach().double().numpy()
            )
        else:
            self.predictor_ = MLPPredictor({name: t.detach().numpy() for name, t in net.state_dict().items()})
        self.classes_ = np.arange(self.num_labels)
        return self

    def _train(self, net, x, y, generator):
        import torch

        net = net.to(self.device).train()
        x = torch.from_numpy(x).to(self.device)
        y = torch.from_numpy(y).long().to(self.device)
        steps_per_epoch = -(-len(y) // self.batch_size)
        optimizer = torch.optim.AdamW(net.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.epochs * steps_per_epoch)
        loss_fn = torch.nn.CrossEntropyLoss()
        for _ in range(self.epochs):
            order = torch.randperm(len(y), generator=generator).to(self.device)
            for start in range(0, len(y), self.batch_size):
                rows = order[start : start + self.batch_size]
                loss = loss_fn(net(x[rows]), y[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        return net.eval().cpu()

    def predict(self, x):
        return self.predictor_.scores(x).argmax(axis=1)
