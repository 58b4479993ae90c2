"""The PyTorch and Opacus side of `cargo bench -p sanctum-node --bench peers`.

A worker the Rust benchmark starts once and drives over stdin/stdout, one JSON object per line,
so that each repetition of ours and each of theirs alternate in one run on the same machine
(drift hits both alike). It builds the same models at the same shapes, with the same batch,
learning rate, clip norm and thread count, and times:

- "train": a plain local round, as a Flower client's `fit` would run it: the global weights
  loaded, `steps` SGD steps over shuffled batches (a fresh permutation each epoch, like a
  DataLoader with shuffle=True; the loss read back each step), the update (local - global).
- "opacus": the same round under Opacus's PrivacyEngine in one grad-sample mode (hooks, ghost,
  ew), Poisson sampling at q = batch / n, noise multiplier and clip norm as given, Opacus's
  default (non-secure) noise.

Requests: {"op": "setup", "model": M, "n": N, "threads": T}, then {"op": "train", "steps": S,
"batch": B, "lr": LR} or {"op": "opacus", "mode": MODE, ...}; each is answered with
{"seconds": s} or {"error": "..."}; {"op": "versions"} answers the packages' versions.
"""

import json
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

warnings.filterwarnings("ignore")


def build(model):
    if model == "logreg":
        return nn.Sequential(nn.Linear(13, 1)), (13,), 1
    if model == "mlp":
        return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10)), (784,), 10
    if model == "cnn":
        # Opacus's MNIST example network.
        net = nn.Sequential(
            nn.Conv2d(1, 16, 5, 2, padding=2), nn.ReLU(), nn.MaxPool2d(2, 1),
            nn.Conv2d(16, 32, 4, 2), nn.ReLU(), nn.MaxPool2d(2, 1),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
        )
        return net, (1, 28, 28), 10
    raise ValueError(f"unknown model {model!r}")


class Peer:
    def setup(self, model, n, threads, device="cpu"):
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.device = torch.device(device)
        self.model_name = model
        self.net, shape, self.outputs = build(model)
        self.global_state = {k: v.clone().to(self.device) for k, v in self.net.state_dict().items()}
        self.x = torch.randn((n,) + shape, device=self.device)
        if self.outputs == 1:
            self.y = torch.randint(0, 2, (n,), device=self.device).float()
        else:
            self.y = torch.randint(0, self.outputs, (n,), device=self.device)
        return {}

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def loss(self, out, y, reduction="mean"):
        if self.outputs == 1:
            return F.binary_cross_entropy_with_logits(out.view(-1), y, reduction=reduction)
        return F.cross_entropy(out, y, reduction=reduction)

    def train(self, steps, batch, lr):
        start = time.perf_counter()
        net, _, _ = build(self.model_name)
        net = net.to(self.device)
        net.load_state_dict(self.global_state)
        opt = torch.optim.SGD(net.parameters(), lr=lr)
        n = self.x.shape[0]
        order, pos, loss_sum = None, n, 0.0
        for _ in range(steps):
            if pos >= n:
                order, pos = torch.randperm(n, device=self.device), 0
            idx = order[pos : pos + batch]
            pos += batch
            out = net(self.x[idx])
            loss = self.loss(out, self.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum += loss.item()
        delta = [p.detach() - self.global_state[k] for k, p in net.state_dict().items()]
        assert all(torch.isfinite(d).all() for d in delta)
        self.sync()
        return {"seconds": time.perf_counter() - start}

    def opacus(self, mode, steps, batch, lr, sigma, clip):
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        net, _, _ = build(self.model_name)
        net = net.to(self.device)
        net.load_state_dict(self.global_state)
        opt = torch.optim.SGD(net.parameters(), lr=lr)
        loader = DataLoader(TensorDataset(self.x, self.y), batch_size=batch)
        engine = PrivacyEngine(secure_mode=False)
        criterion = nn.BCEWithLogitsLoss() if self.outputs == 1 else nn.CrossEntropyLoss()
        if mode == "ghost":
            net, opt, criterion, loader = engine.make_private(
                module=net, optimizer=opt, data_loader=loader, criterion=criterion,
                noise_multiplier=sigma, max_grad_norm=clip, grad_sample_mode="ghost", poisson_sampling=True,
            )
        else:
            net, opt, loader = engine.make_private(
                module=net, optimizer=opt, data_loader=loader,
                noise_multiplier=sigma, max_grad_norm=clip, grad_sample_mode=mode, poisson_sampling=True,
            )
        done, loss_sum = 0, 0.0
        start = time.perf_counter()
        while done < steps:
            for xb, yb in loader:
                if done == steps:
                    break
                if mode == "ew" and xb.shape[0] == 0:
                    # Expanded weights refuse an empty batch (which Poisson sampling draws at small
                    # q): counted as a step that costs nothing, in Opacus's favour.
                    done += 1
                    continue
                # Cleared before the forward pass: expanded weights (ew) refuse a forward while
                # the last step's per-sample gradients are still attached.
                opt.zero_grad()
                out = net(xb)
                loss = criterion(out.view(-1) if self.outputs == 1 else out, yb)
                loss.backward()
                opt.step()
                loss_sum += loss.item()
                done += 1
        self.sync()
        seconds = time.perf_counter() - start
        return {"seconds": seconds}

    def versions(self):
        import opacus

        return {"torch": torch.__version__, "opacus": opacus.__version__, "python": sys.version.split()[0]}


def main():
    peer = Peer()
    for line in sys.stdin:
        req = json.loads(line)
        op = req.pop("op")
        try:
            reply = getattr(peer, op)(**req)
        except Exception as e:  # reported to the benchmark, which prints it in its row
            reply = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
