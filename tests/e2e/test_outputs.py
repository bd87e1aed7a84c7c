"""Outputs that cannot go where they are asked to, and models too big for the machine: one line naming the
path or recipe (exit 2), before any work, and nothing the user had is changed."""

import os
from pathlib import Path

import pytest
import yaml

from moecli.commands.build import build
from moecli.parallel.device import available_memory
from moecli.errors import UserError
from moecli.fileio import atomic_write_text, check_output
from moecli.training.setup import TrainArgs
from moecli.training.trainer import train

# DeepSeek-V3's published sizes (less its multi-head latent attention): about 672e9 parameters, 2.5 TB of
# float32 weights, which no test machine has
FULL_SIZE = {
    "name": "full", "model": {"n_layers": 61, "d_model": 7168, "n_heads": 128, "n_kv_heads": 128,
                              "ffn_dim": 18432, "vocab_size": 129280, "context": 4096},
    "moe": {"num_experts": 256, "top_k": 8, "expert_ffn": 2048, "num_shared_experts": 1, "score_func": "sigmoid",
            "n_groups": 8, "topk_groups": 4, "first_k_dense": 3},
}


def one_line(res):
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and "Traceback" not in res.stderr and len(lines) == 1, res.stderr
    return lines[0]


def test_check_output(tmp_path):
    (tmp_path / "file").write_text("mine")
    (tmp_path / "dir").mkdir()
    for path, directory, message in [
        (tmp_path / "file", True, "file: exists and is not a directory"),
        (tmp_path / "file" / "run", True, "file is a file, not a directory"),
        (tmp_path / "file" / "a" / "b.svg", False, "file is a file, not a directory"),
        (tmp_path / "dir", False, "dir: is a directory; give a file name"),
        (tmp_path / "nodir" / "x.svg", False, "x.svg: no such directory"),
    ]:
        with pytest.raises(UserError, match=message):
            check_output(path, directory)
    check_output(tmp_path / "new" / "deeper", True)  # directories are created with their parents
    check_output(tmp_path / "dir" / "x.svg", False)
    with pytest.raises(UserError, match="is a directory"):
        atomic_write_text(tmp_path / "dir", "text")
    assert (tmp_path / "file").read_text() == "mine" and list((tmp_path / "dir").iterdir()) == []


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no file can be made")
def test_an_output_where_nothing_can_be_written(cli, tmp_path):
    """A place this process cannot write in (here /proc; a read-only file system or a directory without
    permission alike) ended every command in "unexpected FileNotFoundError/PermissionError", exit 1, the
    routing measurement first; now one line naming the place, before any work."""
    with pytest.raises(UserError, match=r"^/proc/out: cannot write in /proc: "):
        check_output(Path("/proc/out"), True)
    with pytest.raises(UserError, match=r"^/proc/r.svg: cannot write in /proc: "):
        check_output(Path("/proc/r.svg"), False)
    ckpt = tmp_path / "ckpt"
    assert cli("build", "mixtral", "-o", ckpt).returncode == 0
    assert one_line(cli("build", "mixtral", "-o", "/proc/out")).startswith("error: /proc/out: cannot write in /proc: ")
    line = one_line(cli("inspect-routing", ckpt, "--svg", "/proc/r.svg"))
    assert line.startswith("error: /proc/r.svg: cannot write in /proc: ")
    if os.geteuid() != 0:  # permissions hold for everyone but root
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(UserError, match="cannot write in .*locked: Permission denied"):
            check_output(locked / "run", True)


def test_train_output_is_a_file(tmp_path, tiny_recipe):
    (tmp_path / "f").write_text("mine")
    (tmp_path / "c.txt").write_text("some text " * 200)
    for out, message in [(tmp_path / "f", "f: exists and is not a directory"),
                         (tmp_path / "f" / "run", "f is a file, not a directory")]:
        with pytest.raises(UserError, match=message):
            train(TrainArgs(str(tiny_recipe()), [str(tmp_path / "c.txt")], out, {}, quiet=True))
    assert (tmp_path / "f").read_text() == "mine"


def test_the_working_directory_as_output(tmp_path, tiny_recipe, monkeypatch):
    """-o . failed with "unexpected StopIteration" (train, build, export, upcycle) or, in an empty working
    directory, with "unexpected OSError" and a stray temporary directory (build/export tried to rename "."). An
    empty one is now filled in place; one with other files is refused as any non-empty output is."""
    from moecli.training.state import foreign_entry

    (tmp_path / "c.txt").write_text("some text " * 200)
    recipe = str(tiny_recipe())
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    build(recipe, ".")
    assert sorted(p.name for p in here.iterdir()) == ["config.json", "model.safetensors"]  # nothing else
    with pytest.raises(UserError, match=r"^\.: output directory exists and is not empty"):
        build(recipe, ".")
    with pytest.raises(UserError, match=r"^\.: is the working directory, or holds it; .*: choose another -o$"):
        build(recipe, ".", force=True)
    monkeypatch.chdir(tmp_path)
    build(recipe, "here", force=True)  # elsewhere --force replaces it, as before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "here", "tiny.yaml"]

    # train -o DIR into a directory that holds other things: a project's metrics.jsonl was replaced and the
    # token cache written into its data/ (which a later run over data/ would then read as text)
    proj = tmp_path / "proj"
    (proj / "data").mkdir(parents=True)
    (proj / "data" / "a.txt").write_text("my text " * 300)
    (proj / "metrics.jsonl").write_text('{"mine": 1}\n')
    monkeypatch.chdir(proj)
    with pytest.raises(UserError, match=r"^\.: output directory holds data/a.txt, which a run does not write"):
        train(TrainArgs(recipe, ["data"], Path("."), {}, quiet=True))
    assert sorted(str(p.relative_to(proj)) for p in proj.rglob("*")) == ["data", "data/a.txt", "metrics.jsonl"]
    assert (proj / "metrics.jsonl").read_text() == '{"mine": 1}\n'
    # a run's own directory, whatever a failed or finished run left there, is not refused for this
    run = tmp_path / "run"
    train(TrainArgs(recipe, [str(tmp_path / "c.txt")], run, {"train.keep_best": True}, quiet=True))
    (run / ".checkpoint.old").mkdir()
    (run / "data" / "tokens.bin.tmp").write_bytes(b"")
    assert foreign_entry(run) is None
    (run / "notes.txt").write_text("mine")
    assert foreign_entry(run) == run / "notes.txt"


def test_cli_outputs_under_a_file(cli, tmp_path):
    (tmp_path / "f").write_text("mine")
    assert "f/x: " in one_line(cli("build", "mixtral", "-o", tmp_path / "f" / "x"))
    ckpt = tmp_path / "ckpt"
    assert cli("build", "mixtral", "-o", ckpt).returncode == 0
    assert "f/x: " in one_line(cli("export", ckpt, "-o", tmp_path / "f" / "x"))
    # --svg is checked before the routing is measured
    assert "is a directory; give a file name" in one_line(cli("inspect-routing", ckpt, "--svg", tmp_path))
    assert (tmp_path / "f").read_text() == "mine"


def test_full_size_recipe_is_measured_without_its_weights(tmp_path):
    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump(FULL_SIZE))
    res = build(str(path), None)  # on the meta device: no 2.5 TB allocation
    assert 6.6e11 < res["params"]["total"] < 6.8e11 and 3.6e10 < res["params"]["active"] < 3.9e10


@pytest.mark.skipif((available_memory() or 0) >= 4 * 6.8e11, reason="this machine could hold the weights")
def test_too_big_to_build_or_train_is_refused(cli, tmp_path):
    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump(FULL_SIZE))
    line = one_line(cli("build", path, "-o", tmp_path / "out"))
    assert "full.yaml: the model's float32 weights: 2," in line and "GiB of memory needed" in line
    (tmp_path / "c.txt").write_text("some text " * 200)
    line = one_line(cli("train", path, tmp_path / "c.txt", "-o", tmp_path / "run"))
    assert "full: training needs about 10," in line and "GiB weights, gradients and AdamW state" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def test_a_checkpoints_file_given_for_its_directory(tmp_path):
    """moe info read config.json or model.safetensors as a recipe ("format: unknown key", a UTF-8 error); every
    command now names the directory to give instead."""
    from moecli.formats.checkpoint import find_checkpoint_dir
    from moecli.commands.info import info

    ckpt = tmp_path / "ckpt"
    build("mixtral", ckpt, {"model.n_layers": 1})
    for name in ("config.json", "model.safetensors"):
        for fn in (info, find_checkpoint_dir):
            with pytest.raises(UserError, match=f"{name}: expected a checkpoint directory .*; give its directory, "
                                                f"{ckpt}$"):
                fn(str(ckpt / name))
    assert info(str(ckpt))["kind"] == "checkpoint"


def _cgroup(d, limit, usage, reclaimable, v2=True):
    d.mkdir(parents=True, exist_ok=True)
    names = ("memory.max", "memory.current", "inactive_file") if v2 else \
        ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
    (d / names[0]).write_text(f"{limit}\n")
    (d / names[1]).write_text(f"{usage}\n")
    (d / "memory.stat").write_text(f"anon {usage}\n{names[2]} {reclaimable}\n")


def test_a_memory_cgroups_limit_is_what_is_available(tmp_path, monkeypatch):
    """Inside a container with a memory limit, MemAvailable is the host's: a model that fits the host but not
    the limit was OOM-killed part-way (rc 137, no message). The cgroup's headroom now caps what is available."""
    from moecli.parallel import device

    proc = tmp_path / "cgroup"
    v2 = tmp_path / "v2"
    (v2 / "cgroup.controllers").parent.mkdir()
    (v2 / "cgroup.controllers").write_text("cpu memory\n")
    proc.write_text("0::/job/step\n")
    assert device.cgroup_headroom(proc, v2) is None  # no limit files: none set
    _cgroup(v2 / "job" / "step", "max", 10 << 20, 0)
    _cgroup(v2 / "job", 3 << 30, 2 << 30, 512 << 20)  # the ancestor's limit applies too: 1.5 GiB left
    assert device.cgroup_headroom(proc, v2) == (3 << 30) - (2 << 30) + (512 << 20)
    _cgroup(v2 / "job" / "step", 1 << 30, 900 << 20, 0)  # tighter below: 124 MiB left
    assert device.cgroup_headroom(proc, v2) == 124 << 20
    proc.write_text("0::/\n")  # a container's own namespace: its limit sits at the root
    _cgroup(v2, 2 << 30, 1 << 30, 0)
    assert device.cgroup_headroom(proc, v2) == 1 << 30
    # cgroup v1 (here beside a v2 hierarchy with no memory controller, as hybrid hosts mount them)
    v1 = tmp_path / "v1"
    (v1 / "unified").mkdir(parents=True)
    proc.write_text("4:memory:/slot\n0::/\n")
    _cgroup(v1 / "memory", 9223372036854771712, 5 << 30, 0, v2=False)  # v1's "unlimited"
    _cgroup(v1 / "memory" / "slot", 4 << 30, 3 << 30, 1 << 30, v2=False)
    assert device.cgroup_headroom(proc, v1) == 2 << 30
    assert device.cgroup_headroom(tmp_path / "missing", v1) is None

    # what is available is the tighter of the host and the cgroup; build -o refuses past it, before writing
    monkeypatch.setattr(device, "cgroup_headroom", lambda: 1 << 20)
    swap = int(dict(line.split(":", 1) for line in open("/proc/meminfo"))["SwapFree"].split()[0]) * 1024
    assert device.available_memory() == (1 << 20) + swap
    if swap < 1 << 20:  # the bundled recipe's float32 weights (several MiB) exceed 1 MiB + that swap
        with pytest.raises(UserError, match=r"^mixtral: the model's float32 weights: 0.0 GiB of memory needed, "
                                            r"0.0 GiB available to this process; without -o"):
            build("mixtral", tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_one_writer_per_output_and_a_dead_writers_lock_is_taken_over(tmp_path, tiny_recipe, cli):
    """An output held by a live moe process is refused to a second writer, naming the holder's pid (train, and the
    commands that write a directory); a killed holder's lock is taken over; the lock file goes with its writer."""
    import signal
    import subprocess
    import sys

    from moecli.fileio import lock_path

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from moecli.fileio import output_lock\n"
        f"with output_lock(Path({str(out)!r})):\n    print('held', flush=True); time.sleep(120)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        recipe = tiny_recipe()
        line = one_line(cli("train", recipe, "-o", out, "--max-steps", "2"))
        assert line == (f"error: {out}: another moe process (pid {holder.pid}) is writing there; wait for it to end, "
                        "or choose another -o")
        assert "another moe process" in one_line(cli("build", recipe, "-o", out))
        assert not out.exists()  # nothing written by the refused commands
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock_path(out).exists()  # left by the killed holder ...
    r = cli("train", tiny_recipe(), "-o", out, "--max-steps", "2", "-q")
    assert r.returncode == 0, r.stderr  # ... and taken over
    assert not lock_path(out).exists() and (out / "checkpoint").is_dir()


def test_two_trainings_started_together_on_one_output(tmp_path, tiny_recipe):
    """Two `moe train -o SAME` at once: one trains, the other is refused (exit 2); metrics.jsonl is one run's."""
    import json
    import subprocess
    import sys

    from support.paths import ROOT

    recipe = tiny_recipe()
    text = tmp_path / "t.txt"
    text.write_text("two writers, one output\n" * 400)
    cmd = [sys.executable, "-m", "moecli.cli", "train", str(recipe), str(text), "-o", str(tmp_path / "run"),
           "--max-steps", "6", "-q"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    assert any("another moe process" in err for rc, err in results if rc == 2)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_killed_writers_temporary_is_removed_by_the_next_writer(tmp_path, tiny_recipe):
    """A writer killed mid-write leaves .NAME.PID.<random>.tmp beside its output; the next command that writes
    there removes it. A live writer's, and anything not named so, stay."""
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid no process has now
    stale_dir = tmp_path / f".out.{dead.pid}.k3j9.tmp"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"\0" * 1024)
    stale_file = tmp_path / f".notes.json.{dead.pid}.x1.tmp"
    stale_file.write_text("{")
    live = tmp_path / f".out.{os.getpid()}.a1.tmp"
    live.mkdir()
    other = tmp_path / ".out.backup"
    other.mkdir()
    build(str(tiny_recipe()), tmp_path / "out")
    assert not stale_dir.exists() and live.is_dir() and other.is_dir() and (tmp_path / "out").is_dir()
    atomic_write_text(tmp_path / "notes.json", "{}")
    assert not stale_file.exists() and (tmp_path / "notes.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == sorted([live.name, other.name])
