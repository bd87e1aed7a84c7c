"""The ``moe`` command: parse arguments, call a library function, render its result.

Exit codes: 0 success, 2 bad input (one-line message), 1 unexpected failure; 130 interrupted, 141 (quietly)
when the reader of stdout goes away, as in `moe generate ... | head`.
Set MOE_DEBUG=1 to see the traceback of an unexpected failure.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer

from moecli.cli import render
from moecli.errors import Interrupted, RunFailed, UserError

app = typer.Typer(
    name="moe",
    help="Mixture-of-Experts toolkit: build, train, upcycle and inspect MoE transformers.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

JSON_OPT = typer.Option(False, "--json", help="Print a machine-readable result on stdout.")
# the options inspect-routing and prune share: how much of DATA, in what windows, in what dtype
MAX_TOKENS_OPT = typer.Option(65536, "--max-tokens", help="Read at most this many tokens of DATA.")
WINDOW_OPT = typer.Option(None, "--seq-len", help="Window length (default: as moe eval's).")
RUN_DTYPE_OPT = typer.Option("auto", "--dtype", help="float32 | bfloat16 (weights and compute; router in fp32); "
                             "auto: float32, bfloat16 for FP8/MXFP4 checkpoints.")
OUT_OPT = typer.Option(None, "-o", "--output", help="Output directory.")
FORCE_OPT = typer.Option(False, "--force", help="Replace a non-empty output directory.")
SET_OPT = typer.Option(None, "--set", help="Override a recipe field, e.g. --set moe.top_k=1 (repeatable).")
STREAM_OPT = typer.Option(False, "--stream", help="Read one layer at a time (chosen by itself when the weights "
                          "do not fit in memory).")
JSONL_OPT = typer.Option("text", "--jsonl-field", help="The text field of each line of .jsonl inputs.")
DEVICE_OPT = typer.Option("cpu", "--device", help="Where the model computes: cpu | cuda | cuda:N | auto (cuda where "
                          "torch sees a GPU, else cpu).")


def _complete_recipe(incomplete: str) -> list[str]:
    """Shell completion of RECIPE: the bundled recipes' names (a path falls back to the shell's file completion)."""
    from moecli.config import list_recipes

    return [name for name in list_recipes() if name.startswith(incomplete)]


def _run(fn: Callable[[], dict], as_json: bool, draw: Callable[[dict], None] | None) -> None:
    try:
        from moecli.moe.experts import threads_from_env

        threads_from_env()  # a bad MOECLI_EXPERT_THREADS fails before anything is written
        result = fn()
    except UserError as e:
        render.error_line(str(e))
        raise typer.Exit(2) from None
    except (RunFailed, Interrupted) as e:
        render.error_line(str(e))
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        render.error_line("interrupted")
        raise typer.Exit(130) from None
    except Exception as e:  # an unexpected failure: short message, traceback only on request
        if os.environ.get("MOE_DEBUG"):
            raise
        render.error_line(f"unexpected {type(e).__name__}: {e} (set MOE_DEBUG=1 for details)")
        raise typer.Exit(1) from None
    try:
        if as_json:
            render.print_json(result)
        elif draw is not None:
            draw(result)
        sys.stdout.flush()
    except BrokenPipeError:
        render.stdout_gone()


def _overrides(items: Optional[List[str]], **flags) -> dict:
    from moecli.config import parse_set_option

    ov = dict(parse_set_option(s) for s in items or [])
    ov.update({k: v for k, v in flags.items() if v is not None})
    return ov


@app.command()
def build(
    recipe: str = typer.Argument(..., help="Recipe YAML file or bundled recipe name (see `moe info`).",
                                 autocompletion=_complete_recipe),
    output: Optional[Path] = OUT_OPT,
    seed: Optional[int] = typer.Option(None, help="Initialisation seed (train.seed)."),
    set_: Optional[List[str]] = SET_OPT,
    force: bool = FORCE_OPT,
    as_json: bool = JSON_OPT,
):
    """Build a model from a recipe: parameter table (total vs active), optional checkpoint."""
    from moecli.commands.build import build as build_fn

    _run(lambda: build_fn(recipe, output, _overrides(set_, **{"train.seed": seed}), force), as_json,
         render.render_build)


# train's flags that set a recipe field: flag parameter -> the field (each one's help names the field)
TRAIN_FLAG_FIELDS = {
    "max_steps": "train.max_steps", "batch_size": "train.batch_size", "grad_accum": "train.grad_accum",
    "seq_len": "train.seq_len", "lr": "train.lr", "lr_schedule": "train.lr_schedule", "seed": "train.seed",
    "eval_interval": "train.eval_interval", "ckpt_interval": "train.ckpt_interval", "precision": "train.precision",
    "keep_best": "train.keep_best", "patience": "train.patience",
    "activation_checkpointing": "train.activation_checkpointing",
}


@app.command()
def train(
    recipe: Optional[str] = typer.Argument(None, help="Recipe YAML or bundled name (not needed with --resume, "
                                           "where a first argument that is not one is DATA; none with --init: "
                                           "then every argument is DATA).", autocompletion=_complete_recipe),
    data: Optional[List[str]] = typer.Argument(None, help="Text files, globs, directories, or - for stdin. "
                                               "Default: the Python standard library's source (embedded corpus)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Run directory (default runs/RECIPE)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="train.max_steps"),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Set train.max_steps to this many passes' worth "
                                           "of the training tokens (windows are drawn at random)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="train.batch_size"),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="train.grad_accum (micro-batches per step)"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="train.seq_len"),
    lr: Optional[float] = typer.Option(None, "--lr", help="train.lr"),
    lr_schedule: Optional[str] = typer.Option(None, "--lr-schedule", help="train.lr_schedule: cosine | linear | "
                                              "wsd | constant (after the warmup)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="train.seed"),
    eval_interval: Optional[int] = typer.Option(None, "--eval-interval", help="train.eval_interval"),
    ckpt_interval: Optional[int] = typer.Option(None, "--ckpt-interval", help="train.ckpt_interval"),
    keep_best: Optional[bool] = typer.Option(None, "--keep-best", help="train.keep_best: also keep OUT/best, the "
                                             "model at the lowest validation loss so far", show_default=False),
    patience: Optional[int] = typer.Option(None, "--patience", help="train.patience: stop after this many "
                                           "validation passes without a lower val loss (0 = never)"),
    precision: Optional[str] = typer.Option(None, "--precision", help="train.precision: fp32 | bf16-mixed "
                                            "(bf16 products, fp32 weights and optimizer)"),
    activation_checkpointing: Optional[bool] = typer.Option(
        None, "--activation-checkpointing", help="train.activation_checkpointing: recompute each block's activations "
        "in the backward instead of keeping them (less memory, for about one more forward)", show_default=False),
    set_: Optional[List[str]] = SET_OPT,
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="A Hugging Face tokenizer.json (default: bytes)."),
    data_weights: Optional[str] = typer.Option(None, "--data-weights", help="Mix the DATA arguments: one sampling "
                                               "weight each, e.g. 3,1 (each then holds out its own validation "
                                               "tail; val_loss is their weighted mean)."),
    val_data: Optional[List[str]] = typer.Option(None, "--val-data", help="Validation text (repeatable: files, globs, "
                                                 "directories, -); default: the last train.val_fraction of DATA."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output from its checkpoint."),
    init: Optional[str] = typer.Option(None, "--init", help="Start from this checkpoint's weights, recipe and "
                                       "tokenizer (a moecli or Hugging Face directory, e.g. an upcycled model)."),
    train_experts: Optional[str] = typer.Option(None, "--train-experts", help="With --init: train only these routed "
                                                "experts, the rest frozen (ESFT): top-p:P (per MoE layer, the experts "
                                                "with the largest gate share on DATA up to P in all) or "
                                                "LAYER:E,E;LAYER:E."),
    lora: Optional[int] = typer.Option(None, "--lora", help="With --init: train LoRA adapters of this rank, the rest "
                                       "frozen (learning rate 2e-4 unless --lr)."),
    lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha", help="The adapters' scale is alpha / rank "
                                               "(default alpha: 2 x rank)."),
    lora_targets: Optional[str] = typer.Option(None, "--lora-targets", help="Comma-separated: attention, experts, "
                                               "shared, dense, router (default: all but router)."),
    base_dtype: str = typer.Option("auto", "--base-dtype", help="With --lora: the frozen base's dtype, float32 | "
                                   "bfloat16 | auto (bfloat16 under --precision bf16-mixed)."),
    nproc: int = typer.Option(1, "--nproc", help="Data-parallel processes (torch.distributed; gloo on CPU)."),
    expert_parallel: bool = typer.Option(False, "--expert-parallel", help="With --nproc: shard experts over ranks."),
    fsdp: bool = typer.Option(False, "--fsdp", help="With --nproc: shard parameters, gradients and optimizer state "
                              "over the ranks (FSDP2, torch.distributed.fsdp.fully_shard)."),
    force: bool = typer.Option(False, "--force", help="Start over in an --output that already holds a run."),
    jsonl_field: str = JSONL_OPT,
    device: str = DEVICE_OPT,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr."),
    as_json: bool = JSON_OPT,
):
    """Train a model on text files; checkpoints and metrics go to --output."""
    flags = dict(locals())  # the parameters, read through TRAIN_FLAG_FIELDS
    from moecli.config import names_a_recipe
    from moecli.parallel.launch import launched_rank
    from moecli.training.setup import TrainArgs, parse_data_weights
    from moecli.training.trainer import train as train_fn

    main_rank = launched_rank() == 0  # under torchrun each process runs this command; rank 0 prints

    def go():  # overrides are parsed in here so a bad --set is a one-line error (exit 2)
        ov = _overrides(set_, **{field: flags[name] for name, field in TRAIN_FLAG_FIELDS.items()})
        files, recipe_arg = list(data or []), recipe
        # no recipe with --init, and none needed with --resume: there the first argument is DATA too
        # (with --resume, unless it reads as a recipe, which the run's own then replaces)
        if recipe is not None and (init or (resume and not names_a_recipe(recipe))):
            files.insert(0, recipe)
            recipe_arg = None
        return train_fn(TrainArgs(recipe_arg, files, output, ov, resume, force, tokenizer, quiet, nproc,
                                  expert_parallel, init=init, val_data=list(val_data or []), jsonl_field=jsonl_field,
                                  epochs=epochs, data_weights=parse_data_weights(data_weights), device=device,
                                  fsdp=fsdp, train_experts=train_experts, lora=lora, lora_alpha=lora_alpha,
                                  lora_targets=lora_targets, base_dtype=base_dtype, progress=render.TrainProgress))

    _run(go, as_json and main_rank, render.render_train if main_rank else None)


@app.command("eval")
def eval_(
    checkpoint: str = typer.Argument(..., help="Checkpoint directory (or a training run directory)."),
    data: Optional[List[str]] = typer.Argument(
        None, help="Text files, globs, directories, or - for stdin; none: the training run's validation split."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Window length (default: a Hugging Face "
                                          "model's context up to 2048, a moecli model's training length; a "
                                          "shorter text's length)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Windows per forward (default: about "
                                             "2048 tokens' worth, at most 16)."),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", help="Score at most this many windows."),
    dtype: str = typer.Option("auto", "--dtype", help="float32 | bfloat16 (weights and compute; loss in fp32); auto: "
                              "float32, bfloat16 for FP8/MXFP4 checkpoints."),
    per_file: bool = typer.Option(False, "--per-file", help="Also score each file (and -) on its own."),
    stream: bool = STREAM_OPT,
    jsonl_field: str = JSONL_OPT,
    device: str = DEVICE_OPT,
    as_json: bool = JSON_OPT,
):
    """Loss and perplexity of a checkpoint on text."""
    from moecli.commands.evaluate import evaluate

    _run(lambda: evaluate(checkpoint, data or [], seq_len, batch_size, max_windows, dtype, per_file, jsonl_field,
                          device, stream), as_json, render.render_eval)


@app.command()
def generate(
    checkpoint: str = typer.Argument(..., help="Checkpoint directory (or a training run directory)."),
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", "-p", help="Prompt text, or - to read it from "
                                               "stdin (repeatable: several are batched, as with --prompts)."),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="Many prompts: a file with one per line (- for "
                                                                 "stdin), or a .jsonl file's \"text\" fields; "
                                                                 "batched, printed at the end."),
    max_new_tokens: int = typer.Option(200, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.8, "--temperature", "-t", help="0 = greedy."),
    top_k: int = typer.Option(50, "--top-k", help="Sample among the k most likely tokens (0 = all)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Then among the most likely tokens that make up this much "
                                                    "probability (nucleus sampling; 1 = all)."),
    seed: int = typer.Option(0, "--seed", help="With --prompts, prompt i (from 0) samples with seed + i."),
    dtype: str = typer.Option("auto", "--dtype", help="float32 | bfloat16 (weights and compute); auto: float32, "
                              "bfloat16 for FP8/MXFP4 checkpoints."),
    num_samples: int = typer.Option(1, "--num-samples", help="Continuations sampled together (one batch)."),
    batch_size: int = typer.Option(8, "--batch-size", help="With --prompts: prompts sampled together."),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="End a completion before this text (repeatable; "
                                                                 "\\n, \\t read as newline, tab)."),
    stop_token: Optional[List[int]] = typer.Option(None, "--stop-token", help="End a completion at this token id "
                                                   "(repeatable; a Hugging Face model's end-of-sequence ids are "
                                                   "added unless --ignore-eos)."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Do not stop at the model's end-of-sequence ids."),
    jsonl_field: str = JSONL_OPT,
    device: str = DEVICE_OPT,
    as_json: bool = JSON_OPT,
    as_jsonl: bool = typer.Option(False, "--jsonl", help="One JSON line per prompt on stdout as soon as its batch "
                                  "is done (its \"index\" from 0, in the order batches finish), for pipelines."),
):
    """Sample a continuation of a prompt, printed as it is sampled (several, --prompts or --json: at the end)."""
    from moecli.commands.generate import Sampling, generate_prompts, parse_stops, read_prompts
    from moecli.commands.generate import generate as generate_fn

    if (not prompt) == (prompts is None) or (prompt or []).count("-") > 1:
        what = ("--prompt -: standard input can be read once" if prompt and prompt.count("-") > 1 else
                "give --prompt TEXT (- for stdin) or --prompts FILE" + (", not both" if prompts is not None else ""))
        render.error_line(f"moe generate: {what} (see moe generate --help)")
        raise typer.Exit(2)
    if as_json and as_jsonl:
        render.error_line("moe generate: give --json (one result at the end) or --jsonl (a line per prompt), "
                          "not both")
        raise typer.Exit(2)
    texts = [sys.stdin.read() if p == "-" else p for p in prompt or []]

    def sampling() -> Sampling:  # called under _run: a bad --stop is one line
        return Sampling(max_new_tokens, temperature, top_k, seed, top_p, num_samples, parse_stops(stop),
                        stop_token or [], ignore_eos)

    if prompts is not None or len(texts) > 1 or as_jsonl:
        on_result = (lambda i, r: render.json_line({"index": i, **r})) if as_jsonl else None
        _run(lambda: generate_prompts(checkpoint, texts or read_prompts(prompts, jsonl_field), sampling(), dtype,
                                      device, batch_size, "--prompt" if texts else "--prompts", on_result),
             as_json, None if as_jsonl else render.render_generated)
        return
    text = texts[0]
    out = None if as_json else render.GenerateStream(text, streamed=num_samples == 1)
    _run(lambda: generate_fn(checkpoint, text, sampling(), dtype, device, out.piece if out and out.streamed else None),
         as_json, out and out.end)


@app.command()
def upcycle(
    source: str = typer.Argument(..., help="Dense checkpoint: a moecli directory or a Hugging Face model directory."),
    output: Optional[Path] = OUT_OPT,
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML file of upcycle options (flags win)."),
    expert: Optional[List[str]] = typer.Option(None, "--expert", help="A dense model whose FFNs become the next "
                                               "routed expert (repeat: one per expert; attention etc. from SOURCE)."),
    num_experts: Optional[int] = typer.Option(None, "--num-experts", "-e",
                                              help="Routed experts per MoE layer (default 8; with --expert: one each)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", "-k", help="Experts per token."),
    granularity: Optional[int] = typer.Option(None, "--granularity", help="Split each FFN copy into g experts."),
    shared_experts: Optional[int] = typer.Option(None, "--shared-experts", help="1: keep the dense FFN as shared."),
    noise: Optional[float] = typer.Option(None, "--noise", help="Relative std of noise added to experts."),
    drop_ratio: Optional[float] = typer.Option(None, "--drop-ratio", help="Drop-Upcycling re-init ratio r."),
    router_init: Optional[str] = typer.Option(None, "--router-init", help="random | zero | prompts"),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="Text file for --router-init prompts."),
    first_k_dense: Optional[int] = typer.Option(None, "--first-k-dense", help="Leave the first k layers dense."),
    moe_every_n: Optional[int] = typer.Option(None, "--moe-every-n", help="Convert every n-th layer."),
    fmt: Optional[str] = typer.Option(None, "--format", help="auto | moecli | mixtral | qwen3_moe | qwen2_moe"),
    shard_size_mb: Optional[float] = typer.Option(None, "--shard-size-mb", help="Largest output shard (HF formats)."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (shapes, sizes, memory); write nothing."),
    allow_inexact: bool = typer.Option(False, "--allow-inexact", help="Convert even if the function changes."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the probe comparison with the dense model."),
    force: bool = FORCE_OPT,
    as_json: bool = JSON_OPT,
):
    """Turn a dense checkpoint into an MoE checkpoint (sparse upcycling), streaming tensor by tensor."""
    from moecli.commands.upcycle import load_options, upcycle as upcycle_fn

    def go():
        opts = load_options(config, {
            "num_experts": num_experts, "top_k": top_k, "granularity": granularity, "shared_experts": shared_experts,
            "noise": noise, "drop_ratio": drop_ratio, "router_init": router_init, "prompts": prompts,
            "first_k_dense": first_k_dense, "moe_every_n": moe_every_n, "format": fmt, "seed": seed,
            "shard_size_mb": shard_size_mb, "experts": expert})
        with render.TensorProgress(enabled=not dry_run) as prog:
            return upcycle_fn(source, output, opts, dry_run=dry_run, force=force, allow_inexact=allow_inexact,
                              verify=not no_verify, progress=prog.update)

    _run(go, as_json, render.render_upcycle)


@app.command()
def export(
    checkpoint: str = typer.Argument(..., help="moecli checkpoint (or training run) directory."),
    output: Path = typer.Option(..., "-o", "--output", help="Output directory (a Hugging Face model directory)."),
    fmt: str = typer.Option("auto", "--format", help="auto | mixtral | qwen3_moe | qwen2_moe | glm4_moe | deepseek_v3 | "
                                                   "deepseek_v2 | gpt_oss | llama4_text | llama | qwen3 | qwen2"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16"),
    shard_size_mb: float = typer.Option(2000.0, "--shard-size-mb", help="Largest weights file; more: an index."),
    adapter: bool = typer.Option(False, "--adapter", help="A LoRA run: write its adapters as a PEFT adapter "
                                 "directory for its base, not the merged model."),
    force: bool = FORCE_OPT,
    as_json: bool = JSON_OPT,
):
    """Write a checkpoint as a Hugging Face model directory (transformers loads it); checked on a probe."""
    if adapter:
        from moecli.commands.adapter import export_adapter

        _run(lambda: export_adapter(checkpoint, output, force), as_json, render.render_adapter)
        return
    from moecli.commands.export import export as export_fn

    _run(lambda: export_fn(checkpoint, output, fmt, dtype, force, shard_size_mb), as_json, render.render_export)


@app.command("inspect-routing")
def inspect_routing(
    checkpoint: str = typer.Argument(..., help="moecli checkpoint, or a Hugging Face MoE directory."),
    data: Optional[List[str]] = typer.Argument(
        None, help="Text files, globs, directories, or - for stdin; none: the training run's validation split."),
    max_tokens: int = MAX_TOKENS_OPT,
    seq_len: Optional[int] = WINDOW_OPT,
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Windows per forward (default: about "
                                             "2048 tokens' worth, at most 8)."),
    capacity_factor: float = typer.Option(1.25, "--capacity-factor", help="For the dropped-token fraction."),
    top_tokens: int = typer.Option(5, "--top-tokens", help="Tokens listed per expert."),
    near_dead: float = typer.Option(0.1, "--near-dead", help="Load (x uniform) below which an expert is near-dead."),
    domain: Optional[List[str]] = typer.Option(None, "--domain", help="NAME=FILE, repeatable: domain specialisation."),
    compare: Optional[str] = typer.Option(None, "--compare", help="Another checkpoint of the run: router saturation."),
    layer: Optional[int] = typer.Option(None, "--layer", help="Layer for the per-expert table (default: worst)."),
    svg: Optional[Path] = typer.Option(None, "--svg", help="Also save the report as an SVG picture."),
    dtype: str = RUN_DTYPE_OPT,
    stream: bool = STREAM_OPT,
    jsonl_field: str = JSONL_OPT,
    device: str = DEVICE_OPT,
    as_json: bool = JSON_OPT,
):
    """Routing balance and specialisation per layer and expert: rich tables, --json, --svg."""
    from moecli.fileio import atomic_write_text, check_output
    from moecli.commands.inspect_routing import RoutingOptions, inspect_routing as inspect_fn

    def go():
        if svg is not None:  # before the routing is measured, not after
            check_output(svg, directory=False)
        res = inspect_fn(checkpoint, data, RoutingOptions(
            max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size, capacity_factor=capacity_factor,
            top_tokens=top_tokens, near_dead=near_dead, domains=domain, compare=compare, dtype=dtype,
            jsonl_field=jsonl_field, device=device, stream=stream))
        if layer is not None and str(layer) not in res["layers"]:
            raise UserError(f"--layer {layer}: not an MoE layer (MoE layers: {', '.join(res['layers'])})")
        if svg is not None:
            atomic_write_text(svg, render.routing_svg(res, None if layer is None else str(layer)))
            res["svg"] = str(svg)
        return res

    _run(go, as_json, lambda r: render.render_routing(r, None if layer is None else str(layer)))


@app.command()
def prune(
    checkpoint: str = typer.Argument(..., help="An MoE checkpoint: moecli's, or a Hugging Face MoE directory."),
    data: Optional[List[str]] = typer.Argument(None, help="Calibration text: files, globs, directories, or - for "
                                               "stdin; its last --holdout share is held out for the loss."),
    output: Optional[Path] = OUT_OPT,
    ratio: Optional[float] = typer.Option(None, "--ratio", help="Share of each MoE layer's routed experts to drop "
                                          "(0.5: half)."),
    keep: Optional[int] = typer.Option(None, "--keep", help="Or: routed experts to keep in every MoE layer."),
    method: str = typer.Option("reap", "--method", help="reap (router-weighted output norm) | ean (output norm) | "
                               "frequency (tokens routed) | random."),
    seed: int = typer.Option(0, "--seed", help="The draw of --method random."),
    max_tokens: int = MAX_TOKENS_OPT,
    holdout: float = typer.Option(0.1, "--holdout", help="Share of those tokens held out for the loss before and "
                                  "after (0: none)."),
    scores: Optional[str] = typer.Option(None, "--scores", help="prune_scores.json of an earlier prune of this "
                                         "model: prune again without a calibration pass."),
    seq_len: Optional[int] = WINDOW_OPT,
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Windows per forward."),
    dtype: str = RUN_DTYPE_OPT,
    stream: bool = STREAM_OPT,
    jsonl_field: str = JSONL_OPT,
    force: bool = FORCE_OPT,
    as_json: bool = JSON_OPT,
):
    """Drop the experts routing on DATA ranks lowest (REAP and baselines); writes the format it read."""
    from moecli.commands.prune import PruneOptions, prune as prune_fn

    opts = PruneOptions(ratio=ratio, keep=keep, method=method, seed=seed, max_tokens=max_tokens, holdout=holdout,
                        seq_len=seq_len, batch_size=batch_size, scores=scores, dtype=dtype, jsonl_field=jsonl_field,
                        stream=stream, force=force)
    _run(lambda: prune_fn(checkpoint, data or [], output, opts), as_json, render.render_prune)


@app.command()
def info(
    target: Optional[str] = typer.Argument(None, help="A checkpoint directory or a recipe; omit for the environment."),
    as_json: bool = JSON_OPT,
):
    """Show a checkpoint's or recipe's layout and parameter counts, or the environment and bundled recipes."""
    from moecli.commands.info import info as info_fn

    _run(lambda: info_fn(target), as_json, render.render_info)


def _print_version(value: bool) -> None:
    if value:  # eager: before click asks for a command
        from moecli import __version__

        print(f"moecli {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True,
                                       callback=_print_version)):
    pass


def _is(e: BaseException, name: str) -> bool:
    """Whether e is click's exception `name` (typer may ship its own copy of click, so match by class name)."""
    return any(c.__name__ == name for c in type(e).__mro__)


def main() -> None:
    """The entry point. Usage errors (a missing argument, an unknown option, a value of the wrong type) are
    one line on stderr, exit 2, like every other bad input; `moe` alone prints the help (exit 2, as before)."""
    try:
        rc = app(prog_name="moe", standalone_mode=False)
    except Exception as e:
        if _is(e, "NoArgsIsHelpError"):  # the help is already printed
            sys.exit(2)
        if _is(e, "UsageError"):
            cmd = e.ctx.command_path if getattr(e, "ctx", None) is not None else "moe"
            render.error_line(f"{cmd}: {e.format_message()} (see {cmd} --help)")
            sys.exit(2)
        if _is(e, "ClickException"):
            render.error_line(e.format_message())
            sys.exit(e.exit_code)
        if _is(e, "Abort"):
            render.error_line("interrupted")
            sys.exit(130)
        raise
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
