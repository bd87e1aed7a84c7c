"""Shell completion (Typer's): moe --show-completion prints a script, and the completion it drives answers
subcommands, options and bundled recipe names."""

def _complete(cli, words: str, cword: int) -> list[str]:
    r = cli(env={"_MOE_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)})
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_show_completion_prints_a_bash_script(cli):
    r = cli("--show-completion", env={"SHELL": "/bin/bash"})
    assert r.returncode == 0, r.stderr
    assert "_MOE_COMPLETE=complete_bash" in r.stdout and "complete -o default -F _moe_completion moe" in r.stdout


def test_completion_answers_commands_options_and_recipes(cli):
    assert _complete(cli, "moe insp", 1) == ["inspect-routing"]
    assert "--max-steps" in _complete(cli, "moe train --max", 2)
    assert _complete(cli, "moe train mixt", 2) == ["mixtral"]
    assert set(_complete(cli, "moe build deepseek-", 2)) == {"deepseek-moe", "deepseek-v3"}


def test_install_completion_writes_into_home(cli, tmp_path):
    r = cli("--install-completion", env={"SHELL": "/bin/bash", "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    script = tmp_path / ".bash_completions" / "moe.sh"
    assert "_MOE_COMPLETE=complete_bash" in script.read_text()
    assert f"source '{script}'" in (tmp_path / ".bashrc").read_text()
