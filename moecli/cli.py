"""The ``moe`` command: parse arguments, call a library function, render its result.

Exit codes: 0 success, 2 bad input (one-line message), 1 unexpected failure.
Set MOE_DEBUG=1 to see the traceback of an unexpected failure.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer

from . import render
from .errors import RunFailed, UserError

app = typer.Typer(
    name="moe",
    help="Mixture-of-Experts toolkit: build, train, upcycle and inspect MoE transformers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

JSON_OPT = typer.Option(False, "--json", help="Print a machine-readable result on stdout.")
OUT_OPT = typer.Option(None, "-o", "--output", help="Output directory.")
FORCE_OPT = typer.Option(False, "--force", help="Replace a non-empty output directory.")
SET_OPT = typer.Option(None, "--set", help="Override a recipe field, e.g. --set moe.top_k=1 (repeatable).")


def _run(fn: Callable[[], dict], as_json: bool, draw: Callable[[dict], None] | None) -> None:
    try:
        result = fn()
    except UserError as e:
        render.error_line(str(e))
        raise typer.Exit(2)
    except RunFailed as e:
        render.error_line(str(e))
        raise typer.Exit(1)
    except KeyboardInterrupt:
        render.error_line("interrupted")
        raise typer.Exit(130)
    except Exception as e:  # an unexpected failure: short message, traceback only on request
        if os.environ.get("MOE_DEBUG"):
            raise
        render.error_line(f"unexpected {type(e).__name__}: {e} (set MOE_DEBUG=1 for details)")
        raise typer.Exit(1)
    if as_json:
        render.print_json(result)
    elif draw is not None:
        draw(result)


def _overrides(items: Optional[List[str]], **flags) -> dict:
    from .config import parse_set_option

    ov = dict(parse_set_option(s) for s in items or [])
    ov.update({k: v for k, v in flags.items() if v is not None})
    return ov


@app.command()
def build(
    recipe: str = typer.Argument(..., help="Recipe YAML file or bundled recipe name (see `moe info --recipes`)."),
    output: Optional[Path] = OUT_OPT,
    seed: Optional[int] = typer.Option(None, help="Initialisation seed (train.seed)."),
    set_: Optional[List[str]] = SET_OPT,
    force: bool = FORCE_OPT,
    as_json: bool = JSON_OPT,
):
    """Build a model from a recipe: parameter table (total vs active), optional checkpoint."""
    from .build import build as build_fn

    _run(lambda: build_fn(recipe, output, _overrides(set_, **{"train.seed": seed}), force), as_json,
         render.render_build)


@app.command()
def info(
    target: Optional[str] = typer.Argument(None, help="A checkpoint directory or a recipe; omit for the environment."),
    as_json: bool = JSON_OPT,
):
    """Show a checkpoint's or recipe's layout and parameter counts, or the environment and bundled recipes."""
    from .info import info as info_fn

    _run(lambda: info_fn(target), as_json, render.render_info)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")):
    if version:
        from . import __version__

        print(__version__)
        raise typer.Exit(0)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
