"""``moe prune``: drop the routed experts that routing shows matter least (REAP and its baselines), from any MoE
checkpoint moecli reads, into the format it read.

1. calibrate: one pass over DATA's calibration text sums, per MoE layer and routed expert, what the forward shows
   (moe/saliency.py: assignments, gates, REAP's and EAN's output norms), the model whole or one layer at a time
   as ``moe eval`` streams it. ``--scores FILE`` reads the sums of an earlier pass (prune_scores.json) instead.
2. select: the same number N of experts kept in every MoE layer (a config holds one expert count), the best by
   ``--method``; with group-limited routing N / n_groups in each group, so that n_group / topk_group hold.
3. write: tensor by tensor, each MoE layer's routed experts, router rows and router biases cut to the kept
   experts, renumbered 0..N-1, fused or per-expert; everything else copied as stored (whole experts are sliced,
   so FP8 and MXFP4 experts stay quantized); the config's expert count cut.
4. measure: the loss on DATA's held-out tail, before and after.
"""

from __future__ import annotations

import copy
import hashlib
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moecli.commands.evaluate import evaluate_loss_streamed
from moecli.config import recipe_from_dict
from moecli.data.corpus import JSONL_FIELD
from moecli.data.tokens import default_batch, default_window, eval_windows, read_tokens
from moecli.errors import RunFailed, UserError, check_at_least
from moecli.fileio import atomic_dir, atomic_write_json, copy_files, output_lock, read_json_object
from moecli.formats import hf
from moecli.formats.checkpoint import Checkpoint, open_checkpoint, open_to_run
from moecli.formats.families import CONTAINERS, FAMILIES
from moecli.formats.layerwise import stream_forward, why_stream
from moecli.formats.native import CONFIG_FILE, MODEL_FILE, dtype_name
from moecli.formats.st_stream import LazyTensors, SafetensorsWriter
from moecli.moe.saliency import METHODS, ExpertSaliency, keep_best
from moecli.training.esft import saliency_pass
from moecli.training.validation import evaluate_loss

SCORES_FILE = "prune_scores.json"
SCORES_FORMAT = "moecli-prune-scores"
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")  # the families' config keys


@dataclass
class PruneOptions:
    """moe prune's options (the CLI's flags, their defaults)."""
    ratio: float | None = None  # the share of each layer's routed experts to drop (floor of ratio x E)
    keep: int | None = None  # or: the routed experts to keep in each MoE layer
    method: str = "reap"  # reap | ean | frequency | random (moe/saliency.py)
    seed: int = 0  # random's draw
    max_tokens: int = 65536  # DATA tokens read: the calibration text, then the held-out tail
    holdout: float = 0.1  # the share of them held out for the loss before and after (0: no loss measured)
    seq_len: int | None = None  # window length (None: as moe eval's)
    batch_size: int | None = None  # windows per forward (None: about BATCH_TOKENS' worth, at most 8)
    scores: str | None = None  # the prune_scores.json of an earlier prune of this model: no calibration pass
    dtype: str = "auto"
    jsonl_field: str = JSONL_FIELD
    stream: bool = False  # read one layer at a time (also when the weights exceed the memory available)
    force: bool = False  # replace a non-empty OUT

    def check(self) -> None:
        if (self.ratio is None) == (self.keep is None):
            raise UserError("give --ratio R (the share of experts to drop) or --keep N (the experts to keep), "
                            "one of them")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise UserError(f"--ratio: must be between 0 and 1 (the share of experts dropped), got {self.ratio}")
        if self.keep is not None:
            check_at_least("--keep", self.keep, 1)
        if self.method not in METHODS:
            raise UserError(f"--method: one of {', '.join(METHODS)}, got {self.method!r}")
        check_at_least("--max-tokens", self.max_tokens, 2)
        if not 0 <= self.holdout < 1:
            raise UserError(f"--holdout: must be in [0, 1) (0: no loss before and after), got {self.holdout}")
        if self.batch_size is not None:
            check_at_least("--batch-size", self.batch_size, 1)


def experts_to_keep(recipe, o: PruneOptions) -> int:
    """N, the experts every MoE layer keeps; a count the routing cannot work with is bad input."""
    m = recipe.moe
    E, K = m.num_experts, m.top_k
    n = o.keep if o.keep is not None else E - int(E * o.ratio)
    what = f"--keep {n}" if o.keep is not None else f"--ratio {o.ratio} (keeps {n} of {E} experts)"
    if n >= E:
        raise UserError(f"{what}: must keep fewer than the model's {E} routed experts")
    if n < K:
        raise UserError(f"{what}: fewer than the {K} experts each token is routed to (top_k)")
    groups = m.n_groups if m.n_groups > 1 else 1
    if n % groups:
        near = sorted({max(groups, n // groups * groups), (n // groups + 1) * groups} - {E})
        raise UserError(f"{what}: not a multiple of the model's {groups} expert groups (n_group), which keep "
                        f"equal counts; keep {' or '.join(map(str, near))}")
    if groups > 1 and m.topk_groups < groups:
        per = n // groups
        if per * m.topk_groups < K:
            raise UserError(f"{what}: {per} per group x topk_group {m.topk_groups} is fewer than top_k {K}")
        if m.score_func == "sigmoid" and per < 2:
            raise UserError(f"{what}: 1 expert per group; DeepSeek-V3-style group scores sum each group's best 2")
    return n


def prune(checkpoint: str, data: list[str], output: Path | None, o: PruneOptions) -> dict:
    """Prune ``checkpoint`` to the experts DATA's routing ranks best (or --scores'), written into OUT atomically,
    with the held-out loss before and after."""
    o.check()
    ckpt, torch_dtype, dev = open_to_run(checkpoint, o.dtype, "cpu")
    recipe = ckpt.recipe
    if not recipe.moe_layer_indices():
        raise UserError(f"{checkpoint}: has no MoE layers (a dense model); nothing to prune")
    if ckpt.lora is not None:
        raise UserError(f"{checkpoint}: a LoRA run (adapters on a base); export it (moe export) and prune that")
    keep = experts_to_keep(recipe, o)
    if output is None:
        raise UserError("-o/--output: required (the directory the pruned model is written to)")
    output = Path(output)
    src, out = ckpt.directory.resolve(), output.resolve()
    if out == src or src in out.parents or out in src.parents:
        raise UserError(f"{output}: must not be the input checkpoint, inside it, or hold it")
    streamed = why_stream(recipe, torch_dtype, o.stream)
    model, tok = ckpt.model_and_tokenizer(torch_dtype, dev, streamed=bool(streamed))
    fp = fingerprint(ckpt)
    saved = read_scores(o.scores, ckpt, fp) if o.scores else None
    if not data and saved is None:
        raise UserError("DATA: give the calibration text (or --scores FILE of an earlier pass)")
    calib, tail, seq_len, why = _split_tokens(model, ckpt, tok, data, o, need_calibration=saved is None)
    batch = o.batch_size or default_batch(seq_len, 8)
    res = {"checkpoint": str(ckpt.directory), "output": str(output), "method": o.method,
           "experts": recipe.moe.num_experts, "keep": keep, "seq_len": seq_len, "seq_len_from": why,
           "batch_size": batch, "dtype": dtype_name(torch_dtype)}
    if streamed:
        res["streamed"] = streamed
    with tempfile.TemporaryDirectory(prefix="moe-prune-") as scratch:
        if saved is None:
            t0 = time.perf_counter()
            sal = calibrate(model, bool(streamed), calib, seq_len, batch, Path(scratch))
            res["calibration"] = {"tokens": int(calib.numel() // seq_len * seq_len),
                                  "seconds": time.perf_counter() - t0}
        else:
            sal = saved
            res["calibration"] = {"scores": str(o.scores), "tokens": next(iter(sal.values())).tokens}
        if tail is not None:
            res["loss_before"] = heldout_loss(model, bool(streamed), tail, seq_len, batch, Path(scratch))
        del model
        scores = rank(sal, o.method, o.seed)
        kept = select(scores, keep, recipe.moe.n_groups)
        with output_lock(Path(output)), atomic_dir(output, overwrite=o.force) as tmp:
            write_pruned(ckpt, tmp, kept, {"method": o.method, "seed": o.seed})
            write_scores(tmp / SCORES_FILE, ckpt, fp, sal, kept, o, seq_len)
            pruned = open_checkpoint(tmp)
            if pruned.recipe.moe.num_experts != keep:
                raise RunFailed(f"the written config reads back as {pruned.recipe.moe.num_experts} experts, "
                                f"not {keep}; nothing was written")
            if tail is not None:
                after, _ = pruned.model_and_tokenizer(torch_dtype, dev, streamed=bool(streamed))
                res["loss_after"] = heldout_loss(after, bool(streamed), tail, seq_len, batch, Path(scratch))
                del after
    if tail is not None:
        res["heldout_tokens"] = int((tail.numel() - 1) // seq_len * seq_len)
        res["loss_increase"] = res["loss_after"] - res["loss_before"]
    res["layers"] = layer_table(sal, scores, kept)
    return res


def _split_tokens(model, ckpt: Checkpoint, tok, data: list[str], o: PruneOptions, need_calibration: bool):
    """(calibration tokens, held-out tail or None, window, why that window): DATA's first max_tokens tokens, the
    last --holdout share of them held out."""
    ctx = model.recipe.model.context
    if o.seq_len is not None and not 1 <= o.seq_len <= ctx:
        raise UserError(f"--seq-len: must be between 1 and the model's context ({ctx}), got {o.seq_len}")
    if not data:  # --scores without DATA: no loss to measure
        return None, None, o.seq_len or default_window(model.recipe, ctx, ckpt.is_hf)[0], "--scores"
    ids = read_tokens(data, tok, o.max_tokens, o.jsonl_field)
    n_tail = int(ids.numel() * o.holdout)
    calib = ids[: ids.numel() - n_tail]
    # a window is not shortened to fit short DATA (as moe eval's is): the scores of one short window mean little
    seq_len, why = (o.seq_len, "--seq-len") if o.seq_len else default_window(model.recipe, ctx, ckpt.is_hf)
    where = ", ".join(data)
    if need_calibration and calib.numel() < seq_len:
        raise UserError(f"{where}: {calib.numel()} tokens to calibrate on (after the --holdout tail); need at least "
                        f"one window of {seq_len}")
    if o.holdout and n_tail < seq_len + 1:
        raise UserError(f"{where}: the held-out tail (--holdout {o.holdout}) is {n_tail} tokens; the loss before "
                        f"and after needs at least {seq_len + 1}: give more text (up to --max-tokens "
                        f"{o.max_tokens}), a larger --holdout, or --holdout 0")
    return calib, (ids[ids.numel() - n_tail:] if o.holdout else None), seq_len, why


@torch.no_grad()
def calibrate(model, streamed: bool, tokens: torch.Tensor, seq_len: int, batch: int, tmp: Path) -> dict:
    """{MoE layer: ExpertSaliency} summed over the windows of ``tokens``, from the model's own forward (whole, or a
    layer reader's blocks one at a time)."""
    n = tokens.numel() // seq_len
    batches = list(tokens[: n * seq_len].view(n, seq_len).long().split(batch))
    if not streamed:
        return saliency_pass(model, batches)
    sal = {i: ExpertSaliency(model.recipe.moe.num_experts) for i in model.recipe.moe_layer_indices()}
    for _ in stream_forward(model, batches, tmp, saliency=sal):
        pass
    return sal


def heldout_loss(model, streamed: bool, tokens: torch.Tensor, seq_len: int, batch: int, tmp: Path) -> float:
    """The mean next-token loss over the windows of ``tokens`` (as moe eval scores them)."""
    starts = eval_windows(tokens, seq_len)
    if streamed:
        return evaluate_loss_streamed(model, tokens, seq_len, starts, batch, tmp)[0]
    return evaluate_loss(model, tokens, seq_len, starts, batch)[0]


def rank(sal: dict[int, ExpertSaliency], method: str, seed: int) -> dict[int, torch.Tensor]:
    """{layer: ``method``'s score of each expert} (random: one seeded draw, layer by layer)."""
    gen = torch.Generator().manual_seed(seed)
    return {i: s.scores(method, gen) for i, s in sorted(sal.items())}


def select(scores: dict[int, torch.Tensor], keep: int, n_groups: int) -> dict[int, list[int]]:
    """{layer: the experts it keeps, in index order}: the best `keep` by their scores, within each group."""
    return {i: keep_best(s, keep, max(1, n_groups)) for i, s in scores.items()}


def layer_table(sal: dict[int, ExpertSaliency], scores: dict[int, torch.Tensor], kept: dict[int, list[int]]) -> dict:
    """Per layer, the experts kept and dropped with the score that ranked them (REAP's too)."""
    out = {}
    for i, s in sorted(sal.items()):
        dropped = [e for e in range(s.E) if e not in set(kept[i])]
        out[str(i)] = {"kept": kept[i], "dropped": dropped, "scores": scores[i].tolist(),
                       "reap": s.scores("reap").tolist(), "tokens_routed": s.sums_4E[0].tolist()}
    return out


# ---------------------------------------------------------------- the scores file


def fingerprint(ckpt: Checkpoint) -> str:
    """A digest of the model's router weights: scores computed on one model are refused on another."""
    names = {i: f"layers.{i}.moe.router.gate.weight" for i in ckpt.recipe.moe_layer_indices()}
    if ckpt.is_hf:
        plain = hf.plain_name_map(ckpt.recipe, ckpt.hf_config["model_type"])
        names = {i: plain[n] for i, n in names.items()}
    src, h = ckpt.tensors(), hashlib.sha256()
    for i, name in sorted(names.items()):
        h.update(src.get(name).to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def write_scores(path: Path, ckpt: Checkpoint, fp: str, sal: dict[int, ExpertSaliency], kept: dict[int, list[int]],
                 o: PruneOptions, seq_len: int) -> None:
    atomic_write_json(path, {
        "format": SCORES_FORMAT, "version": 1, "checkpoint": str(ckpt.directory), "fingerprint": fp,
        "num_experts": ckpt.recipe.moe.num_experts, "seq_len": seq_len,
        "layers": {str(i): s.to_dict() for i, s in sorted(sal.items())},
        "pruned": {"method": o.method, "seed": o.seed, "kept": {str(i): k for i, k in kept.items()}}})


def read_scores(path: str, ckpt: Checkpoint, fp: str) -> dict[int, ExpertSaliency]:
    """--scores FILE: the sums of an earlier pass over this model (its fingerprint), each layer's lists checked."""
    d = read_json_object(Path(path), "prune scores")
    if d.get("format") != SCORES_FORMAT:
        raise UserError(f"{path}: not a {SCORES_FILE} (no \"format\": \"{SCORES_FORMAT}\")")
    if d.get("fingerprint") != fp:
        raise UserError(f"{path}: scores of another model (its routers' fingerprint differs from "
                        f"{ckpt.directory}'s); run the calibration pass on this one")
    E, layers = ckpt.recipe.moe.num_experts, d.get("layers")
    want = sorted(map(str, ckpt.recipe.moe_layer_indices()))
    if not isinstance(layers, dict) or sorted(layers) != want:
        raise UserError(f"{path}: layers: must be this model's MoE layers {want}")
    out = {}
    for i, row in layers.items():
        ok = isinstance(row, dict) and isinstance(row.get("tokens"), int) and all(
            isinstance(row.get(k), list) and len(row[k]) == E and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                for v in row[k]) for k in ("count", "gate", "ean", "reap"))
        if not ok:
            raise UserError(f"{path}: layers.{i}: must hold tokens and count, gate, ean, reap: {E} numbers >= 0 each")
        out[int(i)] = ExpertSaliency.from_dict(row)
    return out


# ---------------------------------------------------------------- writing


def write_pruned(ckpt: Checkpoint, tmp: Path, kept: dict[int, list[int]], how: dict) -> None:
    """The checkpoint with each MoE layer i cut to the experts kept[i] (the same count in every layer), written
    into ``tmp`` in its own format, one tensor at a time."""
    n = len(next(iter(kept.values())))
    if ckpt.is_hf:
        _write_hf(ckpt, tmp, kept, n)
    else:
        _write_moecli(ckpt, tmp, kept, n, how)


def _write_file(src: LazyTensors, names: list[tuple[str, str, list[int] | None]], path: Path, E: int,
                metadata: dict | None) -> int:
    """Write ``names`` = [(stored name, written name, rows or None)] of ``src`` into ``path``, one at a time;
    returns the bytes written."""
    plan = []
    for name, new, rows in names:
        dtype, shape = src.meta(name)
        if rows is not None:
            if not shape or shape[0] != E:
                raise UserError(f"tensor {name}: shape {shape}; expected {E} experts along its first dim")
            shape = (len(rows), *shape[1:])
        plan.append((new, dtype, tuple(shape)))
    w = SafetensorsWriter(path, plan, metadata)
    for name, new, rows in names:  # each shape checked above, from the header
        t = src.get(name)
        w.write(new, t if rows is None else t.index_select(0, torch.tensor(rows)))
    w.close()
    return sum(math.prod(s) * d.itemsize for _, d, s in plan)


def _write_moecli(ckpt: Checkpoint, tmp: Path, kept: dict[int, list[int]], n: int, how: dict) -> None:
    E = ckpt.recipe.moe.num_experts
    src = LazyTensors([ckpt.directory / MODEL_FILE])
    prefixes = {p: i for i in kept for p in (f"layers.{i}.moe.experts.", f"layers.{i}.moe.router.")}
    names = []
    for name in src.keys():
        i = next((i for p, i in prefixes.items() if name.startswith(p)), None)
        names.append((name, name, None if i is None else kept[i]))
    _write_file(src, names, tmp / MODEL_FILE, E, {"format": "pt"})
    recipe = ckpt.recipe.to_dict()
    recipe["moe"]["num_experts"] = n
    cfg = {**copy.deepcopy(ckpt.config), "recipe": recipe_from_dict(recipe, "the pruned recipe").to_dict()}
    cfg["source"] = {"path": str(ckpt.directory), "format": "moecli", "prune": {**how, "keep": n}}
    atomic_write_json(tmp / CONFIG_FILE, cfg)
    copy_files(ckpt.directory, tmp, hf.TOKENIZER_FILES)


def _write_hf(ckpt: Checkpoint, tmp: Path, kept: dict[int, list[int]], n: int) -> None:
    """Every stored tensor under its stored name (a multimodal checkpoint's other towers too), each MoE layer's
    routed experts, router rows and router biases cut; the files as the source cut them, its index rewritten."""
    recipe, mt = ckpt.recipe, ckpt.hf_config["model_type"]
    E, family = recipe.moe.num_experts, FAMILIES[mt]
    read_as = hf.open_tensors(ckpt.directory, ckpt.hf_config)  # the family's names -> the stored ones
    ours: dict[str, list[str]] = {}
    for name in read_as.keys():
        ours.setdefault(read_as.stored.get(name, name), []).append(name)
    routers = {theirs: int(k.split(".")[1]) for k, theirs in hf.plain_name_map(recipe, mt).items()
               if ".moe.router." in k}
    experts = {f"model.layers.{i}.{family.MOE_PREFIX}.experts.": i for i in kept}

    def place(stored: str) -> tuple[str, list[int] | None] | None:
        """(written name, rows kept or None: as stored), or None: an expert dropped."""
        for name in ours.get(stored, [stored]):
            if name in routers:
                return stored, kept[routers[name]]
            i = next((i for p, i in experts.items() if name.startswith(p)), None)
            if i is None:
                continue
            head = name[len(f"model.layers.{i}.{family.MOE_PREFIX}.experts."):].split(".")[0]
            if not head.isdigit():  # fused: every expert in one tensor
                return stored, kept[i]
            e = int(head)
            if e not in kept[i]:
                return None
            at = stored.rindex(f".experts.{e}.")
            return stored[:at] + f".experts.{kept[i].index(e)}." + stored[at + len(f".experts.{e}."):], None
        return stored, None

    raw = LazyTensors.from_dir(ckpt.directory)  # as stored: quantized experts stay quantized
    by_file: dict[Path, list[str]] = {}
    for stored, f in raw.where.items():
        by_file.setdefault(f, []).append(stored)
    weight_map, total = {}, 0
    for f, stored_names in sorted(by_file.items()):
        names = [(s, *p) for s in stored_names if (p := place(s)) is not None]
        total += _write_file(raw, names, tmp / f.name, E, raw.handles[f].metadata())
        weight_map |= {new: f.name for _, new, _ in names}
    if (ckpt.directory / "model.safetensors.index.json").is_file():
        atomic_write_json(tmp / "model.safetensors.index.json",
                          {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    atomic_write_json(tmp / "config.json", _pruned_hf_config(ckpt, n))
    skip = {"config.json", "model.safetensors.index.json"}
    copy_files(ckpt.directory, tmp, [p.name for p in ckpt.directory.iterdir() if p.is_file() and p.name not in skip
                                       and p.suffix not in (".safetensors", ".bin", ".pt", ".pth", ".gguf")])


def _pruned_hf_config(ckpt: Checkpoint, n: int) -> dict:
    """The source's config.json with its expert count (the family's key, in a multimodal config's language model
    part) set to n, nothing else changed."""
    cfg = copy.deepcopy(ckpt.config)
    inner = cfg[CONTAINERS[cfg["model_type"]][1]] if cfg.get("model_type") in CONTAINERS else cfg
    E, cut = ckpt.recipe.moe.num_experts, []
    for key in EXPERT_COUNT_KEYS:
        if inner.get(key) == E:
            inner[key] = n
            cut.append(key)
    if not cut:
        raise RunFailed(f"{ckpt.directory / 'config.json'}: no expert count ({', '.join(EXPERT_COUNT_KEYS)}) "
                        f"equal to {E} found to cut")
    return cfg

