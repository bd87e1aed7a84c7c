"""Rendering of command results: rich tables for people, JSON for pipelines.

Library functions return plain dicts; these functions only draw them.
"""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.table import Table

out = Console(soft_wrap=True)  # results for people (stdout)
err = Console(stderr=True)  # progress, logs, errors


def error_line(msg: str) -> None:
    """One unwrapped line on stderr, whatever the terminal width."""
    msg = " ".join(str(msg).split())
    sys.stderr.write(f"error: {msg}\n")
    sys.stderr.flush()


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def params_table(report: dict, title: str) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column("layer", justify="right")
    t.add_column("FFN")
    t.add_column("experts", justify="right")
    t.add_column("top-k", justify="right")
    t.add_column("shared", justify="right")
    t.add_column("total", justify="right")
    t.add_column("active", justify="right")
    for row in report["layers"]:
        moe = row["kind"] == "moe"
        t.add_row(
            str(row["layer"]), "[cyan]MoE[/]" if moe else "dense",
            str(row["experts"]) if moe else "-", str(row["top_k"]) if moe else "-",
            str(row["shared"]) if moe else "-", human(row["total"]), human(row["active"]),
        )
    t.add_section()
    t.add_row("all", "", "", "", "", f"[bold]{human(report['total'])}[/]", f"[bold]{human(report['active'])}[/]")
    return t


def render_build(res: dict) -> None:
    p = res["params"]
    out.print(params_table(p, f"{res['recipe']}: {res['description']}".rstrip(": ")))
    out.print(
        f"parameters: total {human(p['total'])} ({p['total']:,}), active {human(p['active'])} "
        f"({p['active']:,}, {100 * p['active_fraction']:.1f}%); embeddings {human(p['embedding'])}"
    )
    if res.get("output"):
        out.print(f"checkpoint written to {res['output']}")


def render_info(res: dict) -> None:
    if "recipes" in res:
        out.print(f"moecli {res['moecli']}  torch {res['torch']}  python {res['python']}  "
                  f"threads {res['threads']}  cuda {res['cuda']}")
        t = Table(title="bundled recipes", title_justify="left")
        t.add_column("name")
        t.add_column("description")
        for name, desc in res["recipes"].items():
            t.add_row(name, desc)
        out.print(t)
        return
    render_build({**res, "output": None})
    for key in ("step", "tokens_seen", "source"):
        if key in res:
            out.print(f"{key}: {res[key]}")


class TrainProgress:
    """Per-step progress on stderr: a live bar on a terminal, a log line every ~5% otherwise."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.progress = None
        self.task = None
        self.t0 = None

    def __enter__(self):
        if self.enabled and err.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(), console=err, transient=False,
            )
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
        return False

    def update(self, rec: dict, total: int) -> None:
        if not self.enabled:
            return
        parts = [f"loss {rec['loss']:.4f}"]
        if "val_loss" in rec:
            parts.append(f"val {rec['val_loss']:.4f}")
        parts.append(f"{rec['tokens_per_s']:.0f} tok/s")
        if rec.get("max_vio"):
            parts.append(f"maxvio {max(rec['max_vio']):.2f}")
        if rec.get("dropped_frac"):
            parts.append(f"dropped {100 * rec['dropped_frac']:.1f}%")
        info = "  ".join(parts)
        if self.progress is not None:
            if self.task is None:
                self.task = self.progress.add_task("train", total=total, completed=rec["step"] - 1, info=info)
            self.progress.update(self.task, completed=rec["step"], info=info)
        else:
            every = max(1, total // 20)
            if rec["step"] % every == 0 or rec["step"] == total or "val_loss" in rec:
                err.print(f"step {rec['step']}/{total}  {info}", highlight=False, soft_wrap=True)


def render_train(res: dict) -> None:
    t = Table(title=f"trained {res['recipe']}", title_justify="left", show_header=False)
    t.add_column("")
    t.add_column("")
    for key, fmt in (("final_step", "{}"), ("tokens_seen", "{:,}"), ("final_loss", "{:.4f}"), ("val_loss", "{:.4f}"),
                     ("tokens_per_s", "{:,.0f}"), ("checkpoint", "{}"), ("metrics", "{}")):
        if res.get(key) is not None:
            t.add_row(key.replace("_", " "), fmt.format(res[key]))
    out.print(t)


def render_eval(res: dict) -> None:
    out.print(f"loss {res['loss']:.4f}  perplexity {res['perplexity']:.3f}  "
              f"({res['tokens']:,} tokens in {res['windows']} windows of {res['seq_len']})")


def render_generate(res: dict) -> None:
    sys.stdout.write(res["prompt"] + res["completion"] + "\n")


class TensorProgress:
    """A spinner with a tensor count on stderr while a conversion streams (terminal only)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and err.is_terminal
        self.progress = None
        self.n = 0

    def __enter__(self):
        if self.enabled:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                     console=err, transient=True)
            self.progress.__enter__()
            self.task = self.progress.add_task("converting")
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
        return False

    def update(self, name: str) -> None:
        self.n += 1
        if self.progress is not None:
            self.progress.update(self.task, description=f"tensor {self.n}: {name}")


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def render_upcycle(res: dict) -> None:
    t = Table(title=("plan" if res["dry_run"] else "upcycled") + f": {res['recipe']}", title_justify="left",
              show_header=False)
    t.add_column("")
    t.add_column("")
    rows = [("source", f"{res['source']} ({res['source_format']})"), ("format", res["format"]),
            ("MoE layers", ", ".join(map(str, res["moe_layers"]))),
            ("experts / top-k", f"{res['num_experts']} / {res['top_k']} (granularity {res['granularity']}, "
                                f"shared {res['shared_experts']}, router {res['router_init']})"),
            ("tensors / shards", f"{res['tensors']} / {res['shards']}"),
            ("input size", _mb(res["input_bytes"])), ("output size", _mb(res["output_bytes"])),
            ("memory estimate", _mb(res["memory_estimate_bytes"])),
            ("function-preserving", "yes" if res["exact"] else "no: " + "; ".join(res["inexact_reasons"]))]
    if "max_abs_logit_diff" in res:
        rows.append(("max |logit diff| on probe", f"{res['max_abs_logit_diff']:.3g}"))
    if "seconds" in res:
        rows.append(("time", f"{res['seconds']:.2f} s"))
    if res.get("output") and not res["dry_run"]:
        rows.append(("written to", res["output"]))
    for k, v in rows:
        t.add_row(k, str(v))
    out.print(t)
    if res["dry_run"]:
        p = Table(title="output tensors", title_justify="left")
        p.add_column("name")
        p.add_column("shape")
        p.add_column("dtype")
        for row in res["plan"][:40]:
            p.add_row(row["name"], "x".join(map(str, row["shape"])), row["dtype"])
        if len(res["plan"]) > 40:
            p.add_row(f"... {len(res['plan']) - 40} more", "", "")
        out.print(p)
