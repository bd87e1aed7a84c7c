"""What a run records of its routing: each step's MoE health in its line of OUT/metrics.jsonl, the routing over the
steps since the last validation pass, and the summary's verdict per layer. The Trainer writes these records
(train_step, evaluate); a new run logger (TensorBoard, W&B, CSV) reads them."""

from __future__ import annotations

import torch

from moecli.moe.balance import load_health
from moecli.parallel.collectives import all_sum_


class RoutingWindow:
    """Expert loads summed since the last validation pass: dead experts and collapse show over a window,
    not in one step's batch."""

    def __init__(self, model):
        self.layers = [(i, moe.cfg.top_k) for i, moe in model.moe_layers]
        self.loads = [torch.zeros(moe.cfg.num_experts, dtype=torch.float64) for _, moe in model.moe_layers]
        self.steps = 0

    def add(self, loads: list[torch.Tensor]) -> None:
        for acc, load in zip(self.loads, loads):
            acc += load
        self.steps += 1

    def report(self) -> dict:
        """{"steps": n, "layers": {layer: load_health}, "share": {layer: each expert's share of the window's
        assignments}}; then starts a new window."""
        rep = {"steps": self.steps, "layers": {str(i): load_health(acc, k)
                                               for (i, k), acc in zip(self.layers, self.loads)},
               "share": {str(i): [round(float(v), 5) for v in acc / acc.sum().clamp(min=1)]
                         for (i, _), acc in zip(self.layers, self.loads)}}
        for acc in self.loads:
            acc.zero_()
        self.steps = 0
        return rep


def add_routing_health(rec: dict, m: dict, loads: list[torch.Tensor], layers: list[tuple[int, int]]) -> None:
    """Each MoE layer's max violation this step and the fraction of assignments dropped (over every rank)."""
    if loads:
        rec["max_vio"] = [round(load_health(load, k)["max_vio"], 4) for load, (_, k) in zip(loads, layers)]
        counts = all_sum_(torch.tensor([m["dropped"], m["assignments"]]))
        rec["dropped_frac"] = int(counts[0]) / max(1, int(counts[1]))


def routing_record(routing: dict) -> dict:
    """The routing since the last validation pass as a metrics line holds it: its steps, the layers not ok, the
    shares."""
    return {"steps": routing["steps"], "flagged": {i: {"status": h["status"], "dead": h["dead"]}
                                                   for i, h in routing["layers"].items() if h["status"] != "ok"},
            "share": routing["share"]}


def routing_summary(routing: dict | None) -> dict | None:
    """The last window's routing, per layer, as the summary holds it."""
    if not routing:
        return None
    return {i: {"status": h["status"], "max_vio": round(h["max_vio"], 4), "dead": h["dead"]}
            for i, h in routing["layers"].items()}
