#!/usr/bin/env python3
"""Writes the TorchScript fixtures of node/src/torchscript.rs's tests into node/testdata/torchscript/.

Run once, with its output committed (a clean clone needs neither this script nor torch):

    ~/.cache/sanctum/torch-2.11.0/bin/python node/testdata/make_torchscript.py

(the PyPI torch that scripts/env.sh installs for its libtorch; any torch 2.x writes the same
format). Each module is `torch.jit.script`-ed and saved with `torch.jit.save`, as a consortium's
data scientist would. The weights saved in the files do not matter: a node copies the plan's
global weights into the parameters before it uses the module. The tests hash the files at run
time, so the bytes need not be reproducible.

- logreg.pt: `fc = nn.Linear(13, 1)`, the zoo's `logistic_regression { inputs = 13 }` layout.
- logreg_flat.pt: the same, but `forward` returns shape [n] (`squeeze(1)`), which a node reshapes
  to [n, 1] for outputs = 1.
- mlp.pt: `hidden = ModuleList([Linear(13, 16)])`, `out = Linear(16, 1)`, ReLU between: the zoo's
  `mlp { inputs = 13, hidden = [16] }` layout.
- batchnorm.pt: Linear(13, 8) → BatchNorm1d(8) → Linear(8, 1): has buffers (running statistics)
  that training would change, which a node refuses.
"""

import os

import torch
from torch import nn


class LogReg(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(13, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class LogRegFlat(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(13, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).squeeze(1)


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.ModuleList([nn.Linear(13, 16)])
        self.out = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return self.out(x)


class WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(13, 8)
        self.bn = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.bn(self.fc(x))))


def main():
    torch.manual_seed(0)
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchscript")
    os.makedirs(here, exist_ok=True)
    for name, module in [
        ("logreg", LogReg()),
        ("logreg_flat", LogRegFlat()),
        ("mlp", Mlp()),
        ("batchnorm", WithBatchNorm()),
    ]:
        scripted = torch.jit.script(module)
        path = os.path.join(here, f"{name}.pt")
        torch.jit.save(scripted, path)
        params = [(n, list(p.shape)) for n, p in scripted.named_parameters()]
        buffers = [n for n, _ in scripted.named_buffers()]
        print(f"{path}: parameters {params}, buffers {buffers}")




# Hostile modules a hospital might be asked to approve; each must be refused (node/src/torchscript.rs).
class EvilCopy(nn.Module):
    """Looks like LogReg, but forward writes the first input row into its own weight: the update
    would then carry a patient's record past DP-SGD's clipping and noise."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(13, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A detached view shares the weight's storage: no autograd error, no attribute assignment.
        self.fc.weight.detach().copy_(x[0:1, :] + 1.0)
        return self.fc(x)


class EvilFile(nn.Module):
    """Reads a file of the node's machine into its output."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(13, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leaked = torch.from_file("/etc/hostname", shared=False, size=1, dtype=torch.uint8)
        return self.fc(x) + leaked.to(torch.float32).sum() * 0.0


def write_hostile(out):
    for name, module in [("evil_copy.pt", EvilCopy()), ("evil_file.pt", EvilFile())]:
        torch.jit.save(torch.jit.script(module), os.path.join(out, name))
        print("wrote", name)


if __name__ == "__main__":
    # HOSTILE_ONLY=1 writes only the hostile fixtures, leaving the others' bytes as committed.
    if not os.environ.get("HOSTILE_ONLY"):
        main()
    write_hostile(os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchscript"))
