"""The benchmark problems: a model, a batch and a cross-entropy loss each.

Every problem is deterministic given its seed. ``make(name, batch_size)``
returns a :class:`Problem` whose model is in eval mode (dropout 0, BatchNorm
with running statistics), as curvature computations assume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NUM_CLASSES = 10


@dataclass
class Problem:
    """One benchmark problem."""

    name: str
    description: str
    model: nn.Module
    X: Tensor
    y: Tensor
    loss_fn: nn.Module = field(default_factory=nn.CrossEntropyLoss)

    @property
    def batch_size(self) -> int:
        return self.X.shape[0]

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def num_outputs(self) -> int:
        with torch.no_grad():
            return self.model(self.X[:1]).shape[1:].numel()


# --------------------------------------------------------------------- models
def mlp() -> nn.Module:
    """784-256-256-10 ReLU MLP (MNIST shape)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 256), nn.ReLU(),
        nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, NUM_CLASSES),
    )


def c3d3() -> nn.Module:
    """DeepOBS CIFAR-10 3c3d.

    conv 64 5x5 (valid), ReLU, maxpool 3/2 (same); conv 96 3x3 (valid), ReLU,
    maxpool 3/2 (same); conv 128 3x3 (same), ReLU, maxpool 3/2 (same);
    linear 512, ReLU; linear 256, ReLU; linear 10. DeepOBS pads its 3/2 max
    pools TensorFlow-"same"; with these sizes (28, 12, 6) ``padding=1`` gives
    the same output sizes (14, 6, 3).
    """
    return nn.Sequential(
        nn.Conv2d(3, 64, 5), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(64, 96, 3), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(96, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1),
        nn.Flatten(),
        nn.Linear(3 * 3 * 128, 512), nn.ReLU(),
        nn.Linear(512, 256), nn.ReLU(),
        nn.Linear(256, NUM_CLASSES),
    )


class BasicBlock(nn.Module):
    """Identity residual block with a functional skip: ``relu(bn(conv(...)) + x)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + x)


class SmallResNet(nn.Module):
    """Small CIFAR ResNet: stem, two stages of identity blocks, global pooling, linear.

    The residuals and the pooling are functional (``+``, ``F.relu``,
    ``.mean``) as in torchvision-style code; BatchNorm runs in eval mode.
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.block1 = BasicBlock(width)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn_down = nn.BatchNorm2d(2 * width)
        self.block2 = BasicBlock(2 * width)
        self.fc = nn.Linear(2 * width, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.block1(x)
        x = F.relu(self.bn_down(self.down(x)))
        x = self.block2(x)
        return self.fc(x.mean((2, 3)))


class SmallTransformer(nn.Module):
    """Token classifier: embedding, one post-norm encoder layer, mean pooling, linear."""

    def __init__(self, vocab: int = 1000, d_model: int = 64, nhead: int = 4, ff: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.encoder = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward=ff, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(d_model, NUM_CLASSES)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(1))


def fullggn_mlp() -> nn.Module:
    """64-64-32-10 ReLU MLP, P = 6,570 (a full GGN of 6,570² entries)."""
    return nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(),
        nn.Linear(64, 32), nn.ReLU(),
        nn.Linear(32, NUM_CLASSES),
    )


def conv2d_layer() -> nn.Module:
    """One Conv2d(16, 32, 3x3, padding 1); a frozen linear read-out to 10 classes."""
    head = nn.Linear(32 * 16 * 16, NUM_CLASSES)
    head.requires_grad_(False)
    return nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.Flatten(), head)


def linear_layer() -> nn.Module:
    """One Linear(4096, 10)."""
    return nn.Linear(4096, NUM_CLASSES)


# ------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Spec:
    description: str
    model: Callable[[], nn.Module]
    input_shape: tuple
    default_batch: int = 128
    tokens: Optional[int] = None  # vocabulary size for integer inputs


SPECS: dict[str, Spec] = {
    "mlp": Spec("MLP 784-256-256-10, ReLU", mlp, (784,)),
    "3c3d": Spec("DeepOBS CIFAR-10 3c3d", c3d3, (3, 32, 32)),
    "resnet": Spec("small CIFAR ResNet, functional residuals, BatchNorm eval", SmallResNet, (3, 32, 32)),
    "transformer": Spec(
        "Embedding + TransformerEncoderLayer (d=64, 4 heads, dropout 0, eval), 32 tokens",
        SmallTransformer, (32,), tokens=1000,
    ),
    "fullggn": Spec("MLP 64-64-32-10 for the full GGN", fullggn_mlp, (64,)),
    "conv2d": Spec("single Conv2d(16,32,3x3) on 16x16, frozen linear read-out", conv2d_layer, (16, 16, 16)),
    "linear": Spec("single Linear(4096, 10)", linear_layer, (4096,)),
}

# ``--problem all`` runs these, in this order.
ALL = ["mlp", "3c3d", "resnet", "transformer", "fullggn", "conv2d", "linear"]


def make(name: str, batch_size: Optional[int] = None, seed: int = 0) -> Problem:
    """Build problem ``name`` with ``batch_size`` samples (default: the problem's own)."""
    spec = SPECS[name]
    n = spec.default_batch if batch_size is None else batch_size
    torch.manual_seed(seed)
    model = spec.model().eval()
    if spec.tokens is not None:
        X = torch.randint(0, spec.tokens, (n, *spec.input_shape))
    else:
        X = torch.randn(n, *spec.input_shape)
    y = torch.randint(0, NUM_CLASSES, (n,))
    # Non-trivial BatchNorm statistics, so eval mode is not the identity.
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return Problem(name, spec.description, model, X, y)
