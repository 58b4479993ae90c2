"""The Flower side of `cargo bench -p sanctum-tests --bench rounds`: the same federated work as
Sanctum's round-overhead benchmark, as a Flower App (a ServerApp with Flower's own FedAvg and a
ClientApp), run by `flower_rounds.py` on Flower's deployment engine (SuperLink and SuperNodes as
processes) or its simulation engine.

Each hospital's ClientApp does what a Sanctum node does in a round, timed by itself as its local
work: load the received model, evaluate it on the hospital's test split, take the plan's local
SGD steps on its train split (the heart-disease CSVs Sanctum's nodes read, standardised with the
train split's statistics, as the plan's `per_node` standardisation does), and return the new
weights. The ServerApp records when each round's aggregation returned and the slowest local work
of that round; the overhead is computed on the Rust side, the same way as Sanctum's.

Configuration comes from the environment (both engines' app processes inherit it):
SANCTUM_FLOWER_CONFIG is a JSON object with `model` ("lr" or "mlp"), `inputs`, `hidden`,
`rounds`, `nodes`, `steps`, `batch`, `lr`, `data` (the four CSV paths, in partition order), and
`out` (where the ServerApp writes its JSON).
"""

import csv
import json
import os
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

torch.set_num_threads(1)


def config():
    return json.loads(os.environ["SANCTUM_FLOWER_CONFIG"])


def net(cfg):
    torch.manual_seed(0)
    if cfg["model"] == "lr":
        return torch.nn.Linear(cfg["inputs"], 1)
    layers, width = [], cfg["inputs"]
    for h in cfg["hidden"]:
        layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
        width = h
    layers.append(torch.nn.Linear(width, 1))
    return torch.nn.Sequential(*layers)


def load(path, inputs):
    """A hospital's CSV: `inputs` feature columns, then `label` and `split`."""
    x = {"train": [], "test": []}
    y = {"train": [], "test": []}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            split = "test" if row["split"] == "test" else "train"
            values = list(row.values())
            x[split].append([float(v) if v not in ("", "NA") else 0.0 for v in values[:inputs]])
            y[split].append(float(row["label"]))
    xtr, xte = torch.tensor(x["train"]), torch.tensor(x["test"] or x["train"][:1])
    mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    ytr, yte = torch.tensor(y["train"]), torch.tensor(y["test"] or y["train"][:1])
    return (xtr - mean) / std, ytr, (xte - mean) / std, yte


_data = {}


def data(cfg, partition):
    if partition not in _data:
        _data[partition] = load(cfg["data"][partition], cfg["inputs"])
    return _data[partition]


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context):
    cfg = config()
    partition = int(context.node_config["partition-id"])
    xtr, ytr, xte, yte = data(cfg, partition)
    started = time.perf_counter()
    model = net(cfg)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    with torch.no_grad():
        accuracy = ((model(xte).squeeze(1) > 0).float() == yte).float().mean().item()
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"])
    loss_fn = torch.nn.BCEWithLogitsLoss()
    g = torch.Generator().manual_seed(int(msg.content["config"]["server-round"]))
    order = torch.randperm(len(ytr), generator=g)
    for step in range(cfg["steps"]):
        idx = order[(step * cfg["batch"]) % len(ytr):][: cfg["batch"]]
        opt.zero_grad()
        loss = loss_fn(model(xtr[idx]).squeeze(1), ytr[idx])
        loss.backward()
        opt.step()
    arrays = ArrayRecord(model.state_dict())
    work = time.perf_counter() - started
    metrics = MetricRecord({"work-seconds": work, "accuracy": accuracy, "num-examples": len(ytr)})
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


class TimedFedAvg(FedAvg):
    """Flower's FedAvg, noting when each round's aggregation returned and its slowest local work."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.rounds = []

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        work = max(m.content["metrics"]["work-seconds"] for m in replies if not m.has_error())
        out = super().aggregate_train(server_round, replies)
        self.rounds.append({"round": server_round, "end": time.perf_counter(), "work": work, "replies": len(replies)})
        return out


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context):
    cfg = config()
    n = cfg["nodes"]
    strategy = TimedFedAvg(
        fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n
    )
    model = net(cfg)
    params = sum(p.numel() for p in model.parameters())
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=cfg["rounds"],
        train_config=ConfigRecord({"lr": cfg["lr"]}),
    )
    # Written whole, then renamed: the runner reads the file as soon as it exists.
    tmp = cfg["out"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"params": params, "rounds": strategy.rounds}, f)
    os.replace(tmp, cfg["out"])
