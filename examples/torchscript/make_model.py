#!/usr/bin/env python3
"""Writes model.pt: a consortium data scientist's model for the heart-disease schema, written in
PyTorch and saved as TorchScript, the form a Sanctum node trains.

    ~/.cache/sanctum/torch-2.11.0/bin/python examples/torchscript/make_model.py

(any torch 2.x; the path is the PyPI torch that scripts/env.sh installs for its libtorch).

The module is an MLP 13 -> 16 -> 1 with a ReLU, whose parameters are named as the zoo's
`mlp { inputs = 13, hidden = [16] }` (hidden.0.weight, hidden.0.bias, out.weight, out.bias), so
the example can compare the two: a node copies the plan's global weights into the module before
each round, and the plan's seed initialises both the same way. The weights saved in the file do
not matter. `forward` takes a [batch, 13] float tensor and returns [batch, 1] logits.

Next steps: `sanctum-node model inspect model.pt --inputs 13` prints the file's SHA-256 and the
plan's [model] block; each hospital runs `sanctum-node model approve model.pt --config node.toml
--by NAME --inputs 13` after reviewing this script.
"""

import os

import torch
from torch import nn


class HeartMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.ModuleList([nn.Linear(13, 16)])
        self.out = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return self.out(x)


def main() -> None:
    torch.manual_seed(0)
    here = os.path.dirname(os.path.abspath(__file__))
    module = torch.jit.script(HeartMlp())
    path = os.path.join(here, "model.pt")
    torch.jit.save(module, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
