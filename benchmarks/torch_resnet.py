"""Second reference for the benchmarks: the same ResNets in PyTorch, eager, channels_last.

ImageNet ResNets are torchvision's (``resnet18/34/50/101/152``); the CIFAR ResNets
(``cifar_resnet{6n+2}``, option-A shortcuts) are a small module here, since torchvision has none.
One train step is forward, cross-entropy, backward and SGD with momentum 0.9 and L2 weight decay
1e-4 (``torch.optim.SGD(weight_decay=...)``, the same update as resnet_jax's optimizer).

Library: ``available``, ``create_model``, ``TorchTrainer``.
"""

from __future__ import annotations

import re
import sys
from typing import Any


def available() -> bool:
    """Whether torch and torchvision can be imported."""
    # torchvision pulls in torch's optional GPU compiler (triton), whose import segfaults once
    # TensorFlow (the input pipeline) is loaded in the process; eager CPU/GPU timing never needs it.
    sys.modules.setdefault("triton", None)
    try:
        import torch  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


def _cifar_resnet(n: int, num_classes: int) -> Any:
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self, in_ch: int, out_ch: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(out_ch)
            self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(out_ch)
            self.stride, self.extra = stride, out_ch - in_ch

        def forward(self, x):
            r = F.relu(self.bn1(self.conv1(x)))
            r = self.bn2(self.conv2(r))
            s = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
            if self.extra:  # option A: zero channels appended
                s = F.pad(s, (0, 0, 0, 0, 0, self.extra))
            return F.relu(r + s)

    class CifarResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            layers, in_ch = [], 16
            for i, width in enumerate((16, 32, 64)):
                for j in range(n):
                    layers.append(Block(in_ch, width, 2 if i > 0 and j == 0 else 1))
                    in_ch = width
            self.layers = nn.Sequential(*layers)
            self.fc = nn.Linear(64, num_classes)

        def forward(self, x):
            x = self.layers(F.relu(self.bn1(self.conv1(x))))
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    return CifarResNet()


def create_model(name: str, num_classes: int) -> Any:
    """A torch ``nn.Module`` for ``name``.

    Raises:
      ValueError: a name this reference does not cover.
    """
    import torchvision

    m = re.fullmatch(r"(resnet|cifar_resnet)(\d+)", name)
    if m and m.group(1) == "resnet" and int(m.group(2)) in (18, 34, 50, 101, 152):
        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    if m and m.group(1) == "cifar_resnet" and (int(m.group(2)) - 2) % 6 == 0 and int(m.group(2)) >= 8:
        return _cifar_resnet((int(m.group(2)) - 2) // 6, num_classes)
    raise ValueError(f"no torch reference for {name!r}")


class TorchTrainer:
    """Eager training steps of ``name`` on one fixed random batch (NCHW shape, channels_last memory).

    Runs on the first CUDA GPU when there is one (cuDNN autotuning on), else on the CPU;
    ``half_precision`` runs the forward pass under bfloat16 autocast (float32 parameters).
    """

    def __init__(
        self,
        name: str,
        *,
        num_classes: int,
        batch_size: int,
        image_size: int,
        half_precision: bool = False,
        seed: int = 0,
    ):
        import torch

        torch.manual_seed(seed)
        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.backends.cudnn.benchmark = True
        self.half_precision = half_precision
        model = create_model(name, num_classes).to(self.device, memory_format=torch.channels_last)
        self.model = model.train()
        self.params = sum(p.numel() for p in self.model.parameters())
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        self.loss_fn = torch.nn.CrossEntropyLoss()
        images = torch.randn(batch_size, 3, image_size, image_size, device=self.device)
        self.images = images.contiguous(memory_format=torch.channels_last)
        self.labels = torch.randint(0, num_classes, (batch_size,), device=self.device)

    def step(self) -> float:
        """One training step; returns the loss (which synchronises, like blocking on a JAX step)."""
        self.opt.zero_grad(set_to_none=True)
        with self.torch.autocast(self.device.type, dtype=self.torch.bfloat16, enabled=self.half_precision):
            loss = self.loss_fn(self.model(self.images), self.labels)
        loss.backward()
        self.opt.step()
        return float(loss.detach())
