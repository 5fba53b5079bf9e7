"""`rynn-pipe`: the command line. Each command resolves a config and calls one library function.

    rynn-pipe demo-data demos/                 # a synthetic LIBERO-format suite
    rynn-pipe plan --raw demos/ --recipe demo  # what would run, without running it
    rynn-pipe tokenize --raw demos/ --recipe demo --out out/demo
    rynn-pipe verify out/demo/shards
    rynn-pipe train --shards out/demo/shards --out runs/demo --preset tiny --steps 300

This is the only module that imports typer.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.markup import escape

from pipeline.config import ConfigError
from pipeline.errors import RynnError
from pipeline.progress import console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Robot demonstrations -> pretokenized shards -> a unified VLA + world model.")

RecipeOpt = typer.Option("demo", "--recipe", "-r", help="Suite recipe (see `rynn-pipe recipes`).")
SetOpt = typer.Option(None, "--set", "-s", help="Override a config field: key=value (repeatable).")
OutOpt = typer.Option(None, "--out", "-o", help="Output directory [default: out/<recipe>].")
CacheOpt = typer.Option(None, "--cache", help="Cache root [default: $RYNN_HOME/cache or <out>/cache].")


def friendly(fn: Callable) -> Callable:
    """Show user errors as one clear line and a non-zero exit, not a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (RynnError, ConfigError) as exc:
            console.print(f"[bold red]error[/]: {escape(str(exc))}")
            raise typer.Exit(2 if isinstance(exc, ConfigError) else 1) from None
    return wrapper


def _out(out: Optional[Path], recipe_name: str) -> Path:
    return out if out is not None else Path("out") / recipe_name


@app.command("recipes")
@friendly
def recipes_cmd() -> None:
    """List the suite recipes and their main values."""
    from pipeline.config import ALIASES, RECIPES
    for name, fn in RECIPES.items():
        cfg = fn()
        console.print(f"{name:16s} history={cfg.conv.history} chunk={cfg.conv.chunk} "
                      f"resolution={cfg.image.resolution} format={cfg.source.format}")
    for alias, target in ALIASES.items():
        console.print(f"{alias:16s} = {target}")


@app.command("demo-data")
@friendly
def demo_data_cmd(out: Path = typer.Argument(..., help="Directory to write the suite into."),
                  flavour: str = typer.Option("raw", help="raw (release) or regenerated (no-op)."),
                  size: int = typer.Option(128, help="Image side in pixels (128 or 256)."),
                  tasks: int = typer.Option(3, help="Number of tasks (files)."),
                  demos: int = typer.Option(4, help="Demos per task."),
                  seed: int = typer.Option(0, help="Random seed (output is deterministic).")) -> None:
    """Write a synthetic suite in the exact LIBERO HDF5 format."""
    from pipeline.demo_data import write_demo_suite
    files = write_demo_suite(out, flavour=flavour, size=size, tasks=tasks, demos=demos, seed=seed)
    console.print(f"wrote {len(files)} task files to {out}")


@app.command("plan")
@friendly
def plan_cmd(raw: Path = typer.Option(..., "--raw", help="Raw demonstrations directory."),
             recipe_name: str = RecipeOpt, out: Optional[Path] = OutOpt,
             cache: Optional[Path] = CacheOpt, sets: Optional[list[str]] = SetOpt) -> None:
    """Print which stages are cache hits and which will run, with their work. Runs nothing."""
    from pipeline.workflow import plan, resolve_config
    cfg = resolve_config(recipe_name, sets or [])
    for st in plan(cfg, raw, _out(out, recipe_name), cache):
        state = "[green]cache hit[/]" if st.hit else "[yellow]will run[/]"
        work = ", ".join(f"{k}={v}" for k, v in st.work.items())
        console.print(f"{st.stage.name:12s} {state:22s} key={st.key:16s} {work}")


@app.command("tokenize")
@friendly
def tokenize_cmd(raw: Path = typer.Option(..., "--raw", help="Raw demonstrations directory."),
                 recipe_name: str = RecipeOpt, out: Optional[Path] = OutOpt,
                 cache: Optional[Path] = CacheOpt, sets: Optional[list[str]] = SetOpt,
                 until: Optional[str] = typer.Option(None, help="Stop after this stage."),
                 workers: Optional[int] = typer.Option(None, help="VQ encode processes.")) -> None:
    """Run every stage from raw demos to webdataset shards; print where the shards are."""
    from pipeline.workflow import resolve_config, tokenize
    overrides = list(sets or []) + ([f"image.workers={workers}"] if workers else [])
    cfg = resolve_config(recipe_name, overrides)
    out = _out(out, recipe_name)
    done = tokenize(cfg, raw, out, cache, until=until)
    if "shards" in done:
        console.print(f"[bold green]shards[/]: {out / 'shards'}")
    print(out / "shards" if "shards" in done else done[list(done)[-1]])


@app.command("verify")
@friendly
def verify_cmd(shards: Path = typer.Argument(..., help="A shard directory.")) -> None:
    """Re-hash every shard and re-check every sample; exit non-zero on any mismatch."""
    from shards.verify import verify
    report = verify(shards)
    for problem in report.problems:
        console.print(f"[red]FAIL[/] {problem}")
    if report.problems:
        raise typer.Exit(1)
    console.print(f"[green]OK[/] {report.summary()}")


@app.command("inspect")
@friendly
def inspect_cmd(shards: Path = typer.Argument(..., help="A shard directory."),
                out: Path = typer.Option(Path("sample.png"), "--out", "-o", help="PNG to write."),
                index: int = typer.Option(0, help="Sample index within its kind."),
                kind: str = typer.Option("vla", help="vla or wm."),
                vq_path: Optional[str] = typer.Option(None, help="VQ-GAN weights for decoding.")) -> None:
    """Render one sample to a PNG: images, instruction, state and actions, token segments."""
    from shards.inspect import inspect
    path = inspect(shards, out, index=index, kind=kind, vq_path=vq_path)
    console.print(f"wrote {path}")


@app.command("decode")
@friendly
def decode_cmd(store: Path = typer.Argument(..., help="A pretokenize output dir (codes/ + store.json)."),
               episode: str = typer.Argument(..., help="Episode id (a codes/<id>.npy file)."),
               out: Path = typer.Option(Path("decoded"), "--out", "-o", help="PNG directory."),
               frames: Optional[str] = typer.Option(None, help="Comma-separated frame indices."),
               vq_path: Optional[str] = typer.Option(None, help="VQ-GAN weights (local path)."),
               vq_random_arch: str = typer.Option("full", help="Random-init arch: full or small."),
               vq_seed: int = typer.Option(0, help="Random-init seed.")) -> None:
    """Turn stored VQ codes back into images (PNG per frame and view)."""
    from stages.pretokenize import decode_to_png
    picked = [int(f) for f in frames.split(",")] if frames else None
    paths = decode_to_png(store, episode, out, frames=picked, vq_path=vq_path,
                          vq_random_arch=vq_random_arch, vq_seed=vq_seed)
    console.print(f"wrote {len(paths)} images to {out}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
