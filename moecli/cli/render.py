"""Rendering of command results: rich tables for people, JSON for pipelines.

Library functions return plain dicts; these functions only draw them.
"""

from __future__ import annotations

import json
import os
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def stdout_gone() -> None:
    """The reader of stdout went away (`moe ... | head`): stop quietly with 141 (128 + SIGPIPE), as Unix
    tools do; stdout goes to /dev/null so that Python's flush at exit does not fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    raise SystemExit(141)


class _Stdout(Console):
    def on_broken_pipe(self) -> None:  # rich's own exits 1, which reads as a failure
        self.quiet = True
        stdout_gone()


# results for people (stdout); wide when piped, since --json is the machine format
out = _Stdout(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)  # progress, logs, errors


def error_line(msg: str) -> None:
    """One unwrapped line on stderr, whatever the terminal width."""
    msg = " ".join(str(msg).split())
    sys.stderr.write(f"error: {msg}\n")
    sys.stderr.flush()


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")
    sys.stdout.flush()


def json_line(obj) -> None:
    """One JSON object on one line of stdout, flushed (--jsonl: a pipeline reads each as it comes)."""
    try:
        sys.stdout.write(json.dumps(obj, default=_json_default) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # `moe generate ... --jsonl | head -1`
        stdout_gone()


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def params_table(report: dict, title: str) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column("layer", justify="right")
    kinds = {row.get("attention_type", "full") for row in report["layers"]}
    attention = kinds != {"full"}  # a column only where layers differ (or are not plain full attention)
    if attention:
        t.add_column("attention")
    t.add_column("FFN")
    t.add_column("experts", justify="right")
    t.add_column("top-k", justify="right")
    t.add_column("shared", justify="right")
    t.add_column("total", justify="right")
    t.add_column("active", justify="right")
    runs: list[list[dict]] = []  # consecutive layers alike but for their index share a row ("3-60")
    for row in report["layers"]:
        if runs and {**runs[-1][0], "layer": row["layer"]} == row:
            runs[-1].append(row)
        else:
            runs.append([row])
    for run in runs:
        row = run[0]
        moe = row["kind"] == "moe"
        t.add_row(
            str(row["layer"]) + (f"-{run[-1]['layer']}" if len(run) > 1 else ""),
            *([row.get("attention_type", "full")] if attention else []), "[cyan]MoE[/]" if moe else "dense",
            str(row["experts"]) if moe else "-", str(row["top_k"]) if moe else "-",
            str(row["shared"]) if moe else "-", human(row["total"]), human(row["active"]),
        )
    t.add_section()
    t.add_row("all", *[""] * (5 if attention else 4), f"[bold]{human(report['total'])}[/]", f"[bold]{human(report['active'])}[/]")
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
                  f"threads {res['threads']} (expert threads: {res['expert_threads']})  cuda {res['cuda']}")
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
    for key in ("loss", "val_loss"):
        if key in res:
            out.print(f"{key}: {res[key]['value']:.4f} (step {res[key]['step']})")
    for src, loss in res.get("val_loss_by_source", {}).get("value", {}).items():
        out.print(f"  {escape(src)}: {loss:.4f}")
    if res.get("data_mix"):
        out.print("data mix: " + ", ".join(f"{escape(m['source'])} {m['weight']:.3g} ({m['tokens']:,} tokens)"
                                           for m in res["data_mix"]))
    if "routing" in res:
        out.print(f"routing (validation window ending at step {res['routing']['step']}): "
                  + routing_verdict(res["routing"]["value"].get("flagged", {})))
    if "early_stop" in res:
        out.print(f"stopped early at step {res['early_stop']['step']}: {early_stop_text(res['early_stop']['value'])}")
    if res.get("memory"):
        m = res["memory"]
        gib = lambda b: f"{b / 2**30:,.1f} GiB"  # noqa: E731
        avail = "" if m["available_bytes"] is None else f", {gib(m['available_bytes'])} available"
        out.print(f"memory: weights {gib(m['bfloat16_bytes'])} in bfloat16, {gib(m['float32_bytes'])} in float32{avail}"
                  + (f" (stored {m['quantized']}, dequantized as read)" if m["quantized"] else ""))
        st = m["stream_bfloat16"]
        out.print(f"layer by layer (eval, inspect-routing{'; chosen by itself here' if m['streams_by_itself'] else ''}"
                  f"): about {gib(st['expected_peak_bytes'])} peak in bfloat16 at 2048-token batches, largest piece "
                  f"{gib(st['largest_piece_bytes'])}")
    if res.get("weights") is None and "weights" in res:
        out.print("weights: none here (a config.json alone)")
    elif "weights" in res:
        w = res["weights"]
        dtypes = ", ".join(f"{n} {human(c)} values" for n, c in w["dtypes"].items())
        out.print(f"weights: {w['tensors']} tensors in {w['files']} file(s), {_mb(w['bytes'])} ({dtypes})")


class TrainProgress:
    """Per-step progress on stderr: a live bar on a terminal, a log line every ~5% otherwise."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.progress = None
        self.task = None
        self.warned: dict[str, tuple] = {}  # layer -> the routing problem last warned about

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
        if "routing" in rec:
            self._warn_routing(rec)
        if "early_stop" in rec:
            err.print(f"step {rec['step']}: stopped early: {early_stop_text(rec['early_stop'])}", highlight=False,
                      soft_wrap=True)

    def _warn_routing(self, rec: dict) -> None:
        """One line when a layer's experts die or its routing collapses (again only when that changes)."""
        flagged = rec["routing"]["flagged"]
        for layer, f in flagged.items():
            problem = (f["status"] == "collapsed", tuple(f["dead"]))
            if (problem[0] or problem[1]) and self.warned.get(layer) != problem:
                what = "routing collapsed onto a few experts" if problem[0] else f"dead experts {list(problem[1])}"
                err.print(f"[yellow]warning:[/] step {rec['step']}: MoE layer {layer}: {what} over the last "
                          f"{rec['routing']['steps']} steps", highlight=False, soft_wrap=True)
            self.warned[layer] = problem
        for layer in set(self.warned) - set(flagged):
            del self.warned[layer]


def kv_table(title: str, rows: list[tuple[str, str]]) -> Table:
    """A headerless two-column table of (label, value) rows."""
    t = Table(title=title, title_justify="left", show_header=False)
    t.add_column("")
    t.add_column("")
    for label, value in rows:
        t.add_row(label, str(value))
    return t


def routing_verdict(flagged: dict) -> str:
    """{layer: {"status", "dead"}} of the flagged layers as one line: "layer 1 collapsed, dead [0, 3]; ..."."""
    return "; ".join(f"layer {i} {f['status']}" + (f", dead {f['dead']}" if f["dead"] else "")
                     for i, f in flagged.items()) or "ok in every MoE layer"


def early_stop_text(e: dict) -> str:
    return (f"no lower val loss in {e['passes']} validation passes "
            f"(lowest {e['lowest_val_loss']:.4f}, at step {e['lowest_step']})")


def render_train(res: dict) -> None:
    fmts = (("final_step", "{}"), ("tokens_seen", "{:,}"), ("epochs", "{:.3g}"), ("final_loss", "{:.4f}"),
            ("val_loss", "{:.4f}"), ("tokens_per_s", "{:,.0f}"), ("checkpoint", "{}"), ("metrics", "{}"))
    rows = [(key.replace("_", " "), fmt.format(res[key])) for key, fmt in fmts if res.get(key) is not None]
    by_source = res.get("val_loss_by_source") or {}
    for m in res.get("data_mix") or []:  # --data-weights: each source's share, and its own val loss
        loss = by_source.get(m["source"])
        rows.append((f"source {escape(m['source'])}", f"weight {m['weight']:.3g}, {m['train_tokens']:,} training tokens"
                     + (f", val loss {loss:.4f}" if loss is not None else "")))
    if res.get("finetune_defaults"):  # --init: what it chose, and how to choose otherwise
        ft = res["finetune_defaults"]
        rows.append(("fine-tuning defaults", ", ".join(f"{k} {v:g}" for k, v in ft.items())
                     + " (--init; set with --lr or --set train.FIELD=...)"))
    if res.get("lora"):  # --lora: the adapters and what they sit on
        lo = res["lora"]
        rows.append(("LoRA", f"rank {lo['rank']}, alpha {lo['alpha']:g} on {', '.join(lo['targets'])} "
                     f"({res['trainable_parameters']:,} parameters; the base frozen in {lo['base_dtype']})"))
    if res.get("train_experts"):  # --train-experts: what trained
        chosen = res["train_experts"]
        rows.append(("trained experts", "; ".join(f"layer {i}: {', '.join(map(str, v))}" for i, v in chosen.items())
                     + f" ({res['trainable_parameters']:,} parameters; the rest frozen)"))
    if res.get("stopped_early"):
        rows.append(("stopped early", early_stop_text(res["stopped_early"])))
    for note in res.get("notes") or []:  # --resume: nothing left to train, a changed schedule
        rows.append(("note", escape(note)))
    if res.get("best"):
        rows.append(("best model", f"{res['best']['checkpoint']} (val loss {res['best']['val_loss']:.4f})"))
    if res.get("routing"):
        rows.append(("routing (last window)",
                     routing_verdict({i: r for i, r in res["routing"].items() if r["status"] != "ok"})))
    out.print(kv_table(f"trained {res['recipe']}", rows))


def render_streamed(res: dict) -> None:
    st = res.get("streamed")
    if st:
        err.print(f"read one layer at a time ({st['why']}): expected peak memory {st['expected_peak_bytes'] / 2**30:.2f} "
                  f"GiB (largest piece {st['largest_piece_bytes'] / 2**30:.2f} GiB)", highlight=False)


def render_eval(res: dict) -> None:
    render_streamed(res)
    out.print(f"loss {res['loss']:.4f}  perplexity {res['perplexity']:.3f}  "
              f"({res['tokens']:,} tokens in {res['windows']} window{'s' * (res['windows'] != 1)} of {res['seq_len']}: "
              f"{res['seq_len_from']}; {res['dtype']}; {escape(res['data'])})")
    if res.get("files"):
        t = Table(title="per file", title_justify="left")
        for col in ("file", "loss", "perplexity", "tokens", "windows"):
            t.add_column(col, justify="left" if col == "file" else "right")
        for f in res["files"]:
            t.add_row(escape(f["data"]), f"{f['loss']:.4f}", f"{f['perplexity']:.3f}", f"{f['tokens']:,}",
                      f"{f['windows']} x {f['seq_len']}")
        out.print(t)


def render_adapter(res: dict) -> None:
    base = (f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({res['base']!r}), {res['output']!r})"
            if res["base_is_hf"] else f"the {res['family']} export of {res['base']} (moe export), then PeftModel")
    out.print(f"wrote a PEFT LoRA adapter (rank {res['rank']}, alpha {res['alpha']:g}; {res['target_modules']} "
              f"modules" + (f", experts through {', '.join(res['target_parameters'])}" if res["target_parameters"]
                           else "") + f") to {escape(res['output'])}; load it with {escape(base)}", highlight=False)


def render_prune(res: dict) -> None:
    cal = res["calibration"]
    where = (f"scores from {escape(cal['scores'])}" if "scores" in cal else
             f"calibrated on {cal['tokens']:,} tokens in {cal['seconds']:.1f} s")
    out.print(f"pruned {escape(res['checkpoint'])} -> {escape(res['output'])}: {res['keep']} of {res['experts']} "
              f"routed experts kept per MoE layer by {res['method']} ({where}; {res['dtype']}"
              + (f"; streamed: {escape(res['streamed'])}" if res.get("streamed") else "") + ")")
    t = Table(title="experts per layer (score: the method's; REAP for reference)", title_justify="left")
    for col in ("layer", "kept", "dropped (score)", "lowest kept score"):
        t.add_column(col, justify="right" if col == "layer" else "left")
    for name, L in res["layers"].items():
        s = L["scores"]
        dropped = ", ".join(f"{e} ({s[e]:.3g})" for e in L["dropped"])
        low = min(L["kept"], key=lambda e: s[e])
        t.add_row(name, ", ".join(map(str, L["kept"])), dropped, f"{low}: {s[low]:.3g}")
    out.print(t)
    if "loss_before" in res:
        out.print(f"held-out loss ({res['heldout_tokens']:,} tokens, windows of {res['seq_len']}): "
                  f"{res['loss_before']:.4f} before, {res['loss_after']:.4f} after ({res['loss_increase']:+.4f})")


class GenerateStream:
    """Prints a completion as it is sampled: the prompt with the first piece, each piece as it comes
    (flushed, so a pipe sees it at once), and the end of line last (with the prompt, if no piece came).
    Not streamed (several samples): each sample as prompt + completion, with a line of --- between."""

    def __init__(self, prompt: str, streamed: bool = True):
        self.prompt, self.streamed, self.started = prompt, streamed, False

    def piece(self, text: str) -> None:
        try:
            if not self.started:
                sys.stdout.write(self.prompt)
                self.started = True
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:  # `moe generate ... | head`
            stdout_gone()

    def end(self, res: dict) -> None:
        if self.streamed:
            sys.stdout.write(("" if self.started else self.prompt) + "\n")
            return
        render_generated({"results": [res]})


def render_generated(res: dict) -> None:
    """Each completion of each prompt (``generate_prompts``' "results") after its prompt, --- between."""
    sys.stdout.write("---\n".join(r["prompt"] + c + "\n" for r in res["results"]
                                  for c in r.get("completions", [r["completion"]])))


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


def render_export(res: dict) -> None:
    rows = [("source", res["source"]), ("architecture", f"{res['architecture']} ({res['format']}, {res['dtype']})"),
            ("tensors", f"{res['tensors']} in {res['shards']} file{'s' if res['shards'] > 1 else ''}"),
            ("size", _mb(res["bytes"])),
            ("copied from source", ", ".join(res["copied"]) or "nothing (byte tokenizer: no tokenizer.json)"),
            ("max |logit diff| on probe", f"{res['max_abs_logit_diff']:.3g} (largest logit "
                                          f"{res['max_abs_logit']:.3g})"), ("written to", res["output"])]
    out.print(kv_table("exported", rows))


def render_upcycle(res: dict) -> None:
    rows = [("source", f"{res['source']} ({res['source_format']})"), ("format", res["format"]),
            ("MoE layers", ", ".join(map(str, res["moe_layers"]))),
            ("experts / top-k", f"{res['num_experts']} / {res['top_k']} (granularity {res['granularity']}, "
                                f"shared {res['shared_experts']}, router {res['router_init']})"),
            ("tensors / shards", f"{res['tensors']} / {res['shards']}"),
            ("input size", _mb(res["input_bytes"])), ("output size", _mb(res["output_bytes"])),
            ("memory estimate", _mb(res["memory_estimate_bytes"])),
            ("function-preserving", "yes" if res["exact"] else "no: " + "; ".join(
                res["inexact_reasons"] or ["experts from several models (no single dense function)"]))]
    for src, diffs in res.get("per_source_layer_diff", {}).items():
        rows.append((f"vs {src}", f"per-layer hidden-state difference {min(diffs):.3g} to {max(diffs):.3g} "
                                  f"(relative, on the probe)"))
    if "max_abs_logit_diff" in res:
        rows.append(("max |logit diff| on probe", f"{res['max_abs_logit_diff']:.3g}"))
    if "seconds" in res:
        rows.append(("time", f"{res['seconds']:.2f} s"))
    if res.get("output") and not res["dry_run"]:
        rows.append(("written to", res["output"]))
    out.print(kv_table(("plan" if res["dry_run"] else "upcycled") + f": {res['recipe']}", rows))
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


def _vio_style(v: float) -> str:
    return "green" if v < 0.25 else "yellow" if v < 1.0 else "red"


def _load_style(rel: float) -> str:
    """Colour of one heatmap cell: blue = starved, green = about uniform, red = overloaded."""
    if rel == 0:
        return "grey30"
    if rel < 0.5:
        return "blue"
    if rel < 0.8:
        return "cyan"
    if rel <= 1.25:
        return "green"
    if rel <= 2.0:
        return "yellow"
    return "red"


def routing_tables(res: dict, detail_layer: str | None = None) -> list:
    from rich.text import Text

    items = []
    window = f" in windows of {res['seq_len']} ({res['seq_len_from']})" if "seq_len_from" in res else ""
    s = Table(title=f"routing of {res['recipe']} over {res['tokens']:,} tokens of {res.get('data', 'DATA')}{window} "
                    f"(capacity factor {res['capacity_factor']} for the dropped column)", title_justify="left")
    for col in ("layer", "E/k", "MaxVio", "CV", "H(route)", "H(load)", "dead/near", "dropped", "gate1", "z mean/max",
                "vocab", "status"):
        s.add_column(col, justify="left" if col == "status" else "right", no_wrap=True)
    for name, L in res["layers"].items():
        st = {"ok": "green", "imbalanced": "yellow", "collapsed": "bold red"}[L["status"]]
        s.add_row(name, f"{L['experts_n']}/{L['top_k']}", f"[{_vio_style(L['max_vio'])}]{L['max_vio']:.2f}[/]",
                  f"{L['cv']:.2f}", f"{L['entropy']:.2f}", f"{L['load_entropy']:.2f}",
                  f"{len(L['dead'])}/{len(L['near_dead'])}",
                  "-" if L["dropped_frac"] is None else f"{100 * L['dropped_frac']:.1f}%",
                  f"{L['top1_gate_mean']:.2f}", f"{L['z_mean']:.1f}/{L['z_max']:.1f}",
                  f"{L['vocab_specialization']:.2f}", f"[{st}]{L['status']}[/]")
    s.caption = ("H = entropy / log E (route: per token; load: of the expert shares); gate1 = mean top-1 weight; "
                 "vocab = mean P(expert | token) over its tokens (token-blind router: k/E)")
    items.append(s)

    heat = Text("load per expert (layer x expert; blue starved, green uniform, red overloaded):\n")
    for name, L in res["layers"].items():
        heat.append(f"{name:>5} ")
        for e in L["experts"]:
            heat.append("█", style=_load_style(e["load_rel"]))
        heat.append(f"  max {max(e['load_rel'] for e in L['experts']):.2f}x\n")
    items.append(heat)

    if detail_layer is None:
        detail_layer = max(res["layers"], key=lambda k: res["layers"][k]["max_vio"])
    if detail_layer not in res["layers"]:
        raise KeyError(detail_layer)
    L = res["layers"][detail_layer]
    d = Table(title=f"experts of layer {detail_layer}", title_justify="left")
    for col in ("expert", "share", "load", "mean gate", "REAP", "vocab spec.", "top tokens (P(expert|token))"):
        d.add_column(col, justify="left" if col.startswith("top") else "right")
    reap_rank = {e["expert"]: r for r, e in enumerate(sorted(L["experts"], key=lambda e: -e.get("reap", 0.0)))}
    for e in L["experts"]:
        toks = ", ".join(f"{t['text']!r} {t['p_expert_given_token']:.2f}" for t in e["top_tokens"])
        reap = f"{e['reap']:.3g} #{reap_rank[e['expert']] + 1}" if "reap" in e else "-"
        d.add_row(str(e["expert"]), f"{100 * e['share']:.1f}%", f"[{_load_style(e['load_rel'])}]{e['load_rel']:.2f}x[/]",
                  f"{e['mean_gate']:.3f}", reap, f"{e['vocab_specialization']:.2f}", toks)
    items.append(d)
    if L.get("top_coactivation"):
        c = Table(title=f"most frequent co-activations in layer {detail_layer} (all pairs ranked)", title_justify="left")
        for col in ("a", "b", "P(b | a)", "tokens"):
            c.add_column(col, justify="right")
        for p in L["top_coactivation"][:8]:
            c.add_row(str(p["a"]), str(p["b"]), f"{p['p_b_given_a']:.2f}", str(p["count"]))
        items.append(c)
    if res.get("domains"):
        dm = Table(title="domain specialisation: top experts by lift (share x E; 1 = uniform)", title_justify="left")
        dm.add_column("layer", justify="right")
        dm.add_column("domain")
        dm.add_column("top experts")
        for layer, doms in res["domains"].items():
            for dname, v in doms.items():
                top = sorted(range(len(v["lift"])), key=lambda e: -v["lift"][e])[:5]
                dm.add_row(layer, dname, ", ".join(f"{e}: {v['lift'][e]:.2f}x" for e in top))
        items.append(dm)
    if res.get("saturation"):
        sat = Table(title=f"router saturation vs {res['saturation']['other']}", title_justify="left")
        for col in ("layer", "top-k overlap", "top-1 agreement"):
            sat.add_column(col, justify="right")
        for layer, v in res["saturation"]["layers"].items():
            sat.add_row(layer, f"{100 * v['topk_overlap']:.1f}%", f"{100 * v['top1_agreement']:.1f}%")
        items.append(sat)
    return items


def render_routing(res: dict, detail_layer: str | None = None) -> None:
    render_streamed(res)
    for item in routing_tables(res, detail_layer):
        out.print(item)
    if res.get("flagged"):
        err.print("flagged layers: " + ", ".join(f"{k} ({v})" for k, v in res["flagged"].items()), highlight=False)


def routing_svg(res: dict, detail_layer: str | None = None) -> str:
    import io

    rec = Console(record=True, file=io.StringIO(), width=150, force_terminal=True, color_system="truecolor")
    for item in routing_tables(res, detail_layer):
        rec.print(item)
    return rec.export_svg(title=f"moe inspect-routing: {res['recipe']}")
