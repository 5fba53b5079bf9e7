"""`rynn-pipe`: the command line. Each command resolves a config and calls one library function.

    rynn-pipe demo-data demos/                 # a synthetic LIBERO-format suite
    rynn-pipe sim-data --env robosuite:Lift --episodes 50 sim/   # real-physics expert demos
    rynn-pipe plan --raw demos/ --recipe demo  # what would run, without running it
    rynn-pipe tokenize --raw demos/ --recipe demo --out out/demo
    torchrun --nproc_per_node 8 -m pipeline.cli tokenize ...   # VQ encoding split over ranks
    rynn-pipe verify out/demo/shards
    rynn-pipe train --shards out/demo/shards --out runs/demo --preset tiny --steps 300
    rynn-pipe rollout --env demo --policy runs/demo/latest --episodes 10 --out runs/demo/rollout

This is the only module that imports typer. Each command imports the library it calls inside
its body: `rynn-pipe --help` and every command start without loading torch, numpy or the
layers below they do not use.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.markup import escape

from pipeline.config import ALIASES, RECIPES, ConfigError
from pipeline.errors import RynnError
from pipeline.group import Group
from pipeline.progress import console
from pipeline.threads import passive_openmp

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Robot demonstrations -> pretokenized shards -> a unified VLA + world model.")

RecipeOpt = typer.Option("demo", "--recipe", "-r", help="Suite recipe (see `rynn-pipe recipes`).")
SetOpt = typer.Option(None, "--set", "-s", help="Override a config field: key=value (repeatable).")
OutOpt = typer.Option(None, "--out", "-o", help="Output directory [default: out/<recipe>].")
CacheOpt = typer.Option(None, "--cache", help="Cache root [default: $RYNN_HOME/cache or <out>/cache].")


def friendly(fn: Callable) -> Callable:
    """Show user errors as one clear line and a non-zero exit, not a traceback: the project's
    own errors, and an input file the OS could not open or read (named)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (RynnError, ConfigError) as exc:
            _error(str(exc))
            raise typer.Exit(2 if isinstance(exc, ConfigError) else 1) from None
        except OSError as exc:
            if exc.filename is None:
                raise
            _error(f"{exc.strerror or type(exc).__name__}: {exc.filename} (check the path and "
                   "its permissions)")
            raise typer.Exit(1) from None
    return wrapper


def _error(msg: str) -> None:
    """One line, never wrapped (a log or pipe keeps it whole)."""
    console.print(f"[bold red]error[/]: {escape(' '.join(msg.split()))}", soft_wrap=True)


def _out(out: Optional[Path], recipe_name: str) -> Path:
    return out if out is not None else Path("out") / recipe_name


@app.command("recipes")
@friendly
def recipes_cmd() -> None:
    """List the suite recipes and their main values."""
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
    from sim.demo_data import write_demo_suite
    files = write_demo_suite(out, flavour=flavour, size=size, tasks=tasks, demos=demos, seed=seed)
    console.print(f"wrote {len(files)} task files to {out}")


@app.command("demo-obs")
@friendly
def demo_obs_cmd(raw: Path = typer.Argument(..., help="A demo suite (rynn-pipe demo-data)."),
                 out: Path = typer.Argument(..., help="Directory for the observation files."),
                 step: int = typer.Option(5, help="Step of the first demo to export.")) -> None:
    """Export one raw observation (frames, state, instruction) for trying `rynn-pipe act`."""
    from sim.demo_data import export_observation
    paths = export_observation(raw, out, step=step)
    console.print(f"wrote {', '.join(p.name for p in paths.values())} to {out}")


@app.command("sim-data")
@friendly
def sim_data_cmd(out: Path = typer.Argument(..., help="Directory to write the HDF5 file into."),
                 env: str = typer.Option("robosuite:Lift", help="Environment spec with an expert."),
                 episodes: int = typer.Option(20, help="Successful episodes to keep."),
                 seed: int = typer.Option(0, help="First episode seed (output is deterministic)."),
                 size: int = typer.Option(128, help="Image side in pixels (128 or 256)."),
                 noise: float = typer.Option(0.0, help="Std of Gaussian noise on the arm actions."),
                 max_failures: Optional[int] = typer.Option(
                     None, help="Failed episodes allowed [default: --episodes].")) -> None:
    """Record the scripted expert in a simulator as LIBERO raw-release HDF5 (successes only)."""
    from sim.record import RecordConfig, record_demos
    result = record_demos(out, RecordConfig(env=env, episodes=episodes, seed=seed, size=size,
                                            noise=noise, max_failures=max_failures))
    failed = f", {len(result.failed_seeds)} failed (seeds {result.failed_seeds})" \
        if result.failed_seeds else ""
    console.print(f"wrote {len(result.kept_seeds)} demos ({result.steps} steps{failed}) to "
                  f"{result.path}")


@app.command("sim-report")
@friendly
def sim_report_cmd(exp: Path = typer.Argument(..., help="Experiment dir (make sim-experiment).")
                   ) -> None:
    """Write EXP/report.md: success rates with 95 % Wilson intervals, training, videos."""
    from sim.experiment import write_report
    path = write_report(exp)
    print(path.read_text())
    console.print(f"report: {path}")


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
        if st.damage is not None:
            state = "[red]damaged[/]: rebuilds"
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
    overrides = list(sets or []) + ([f"image.workers={workers}"] if workers is not None else [])
    cfg = resolve_config(recipe_name, overrides)
    out = _out(out, recipe_name)
    done = tokenize(cfg, raw, out, cache, until=until)
    if not Group.from_env().leader:                # under torchrun rank 0 reports
        return
    if "shards" in done:
        console.print(f"[bold green]shards[/]: {out / 'shards'}")
    print(out / "shards" if "shards" in done else done[list(done)[-1]])


cache_app = typer.Typer(no_args_is_help=True, help="Check and tidy the stage cache.")
app.add_typer(cache_app, name="cache")
CacheDirOpt = typer.Option(None, "--cache", help="Cache root [default: $RYNN_HOME/cache or "
                                                 "<out>/cache].")
CacheOutOpt = typer.Option(Path("out/demo"), "--out", "-o", help="Output directory whose cache "
                                                                 "is meant (with no --cache).")


@cache_app.command("verify")
@friendly
def cache_verify_cmd(cache: Optional[Path] = CacheDirOpt, out: Path = CacheOutOpt) -> None:
    """Re-hash every file of every cached stage output against its stage.json."""
    from pipeline.cache import verify_cache
    from pipeline.workflow import cache_root
    root = cache_root(out, cache)
    report = verify_cache(root)
    for problem in report.problems:
        console.print(f"[red]DAMAGED[/] {escape(problem)}", soft_wrap=True)
    if report.problems:
        console.print(f"{len(report.problems)} of {report.entries} entries damaged; the next "
                      f"run rebuilds them (or `rynn-pipe cache gc --cache {root}`)", soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"[green]OK[/] {report.entries} cache entries verified in {root}")


@cache_app.command("gc")
@friendly
def cache_gc_cmd(cache: Optional[Path] = CacheDirOpt, out: Path = CacheOutOpt,
                 keep: Optional[list[Path]] = typer.Option(
                     None, "--keep", help="Keep only what these outputs (tokenize --out dirs or "
                                          "shard sets) were built from (repeatable).")) -> None:
    """Remove partial, temporary, unfinished and damaged entries (and, with --keep, every entry
    the kept outputs do not use)."""
    from pipeline.cache import gc
    from pipeline.workflow import cache_root
    root = cache_root(out, cache)
    report = gc(root, keep=list(keep) if keep else None)
    for line in report.removed:
        console.print(f"removed {escape(line)}", soft_wrap=True)
    console.print(f"[green]gc[/]: {len(report.removed)} removed, "
                  f"{report.bytes_freed / 2**20:.1f} MiB freed in {root}")


@app.command("verify")
@friendly
def verify_cmd(shards: str = typer.Argument(..., help="A shard directory or URL (http(s)://, fsspec).")) -> None:
    """Re-hash every shard and re-check every sample; exit non-zero on any mismatch."""
    from shards.verify import verify
    report = verify(shards)
    for problem in report.problems:
        console.print(f"[red]FAIL[/] {escape(problem)}", soft_wrap=True)
    if report.problems:
        raise typer.Exit(1)
    console.print(f"[green]OK[/] {report.summary()}")


@app.command("inspect")
@friendly
def inspect_cmd(shards: str = typer.Argument(..., help="A shard directory or URL (http(s)://, fsspec)."),
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
    from stages.encode import decode_to_png
    picked = [int(f) for f in frames.split(",")] if frames else None
    paths = decode_to_png(store, episode, out, frames=picked, vq_path=vq_path,
                          vq_random_arch=vq_random_arch, vq_seed=vq_seed)
    console.print(f"wrote {len(paths)} images to {out}")


@app.command("train")
@friendly
def train_cmd(shards: str = typer.Option(..., "--shards", help="Shard directory (rynn-pipe tokenize) or URL."),
              out: Path = typer.Option(..., "--out", "-o", help="Run directory."),
              preset: str = typer.Option("tiny", help="Model preset: test, tiny, 7b."),
              steps: Optional[int] = typer.Option(None, help="Optimizer steps."),
              resume: bool = typer.Option(False, help="Continue from the run's latest checkpoint."),
              init: Optional[Path] = typer.Option(None, help="Local HF Chameleon checkpoint to start from."),
              sets: Optional[list[str]] = SetOpt) -> None:
    """Train the unified VLA + world model on shards (torchrun launches data parallel)."""
    from trainer.train import train
    from trainer.config import resolve_train_config
    cfg = resolve_train_config(preset, sets or [], steps=steps)
    run = train(cfg, shards, out, resume=resume, init=init)
    console.print(f"[bold green]checkpoints[/]: {run}")


@app.command("export")
@friendly
def export_cmd(run: Path = typer.Argument(..., help="Run directory, step directory or latest."),
               out: Path = typer.Argument(..., help="Export directory (replaced if present)."),
               vq_path: Optional[str] = typer.Option(None, help="VQ-GAN weights (local path)."),
               tokenizer_path: Optional[str] = typer.Option(None, help="text_tokenizer.json path.")) -> None:
    """A Hugging Face Chameleon directory (transformers loads it) + action head + processor card."""
    from trainer.export import export
    path = export(run, out, vq_path=vq_path, tokenizer_path=tokenizer_path)
    console.print(f"[bold green]exported[/]: {path} (Policy.from_pretrained or transformers' "
                  "ChameleonForConditionalGeneration.from_pretrained)")


@app.command("serve")
@friendly
def serve_cmd(checkpoint: Path = typer.Option(..., help="Checkpoint (step dir, run dir, latest) or export."),
              host: str = typer.Option("127.0.0.1", help="Interface (0.0.0.0: every interface)."),
              port: int = typer.Option(8000, help="TCP port (0 picks a free one)."),
              device: str = typer.Option("auto", help="cuda, cpu or auto."),
              vq_path: Optional[str] = typer.Option(None, help="VQ-GAN weights (local path)."),
              tokenizer_path: Optional[str] = typer.Option(None, help="text_tokenizer.json path.")) -> None:
    """Serve the policy over a websocket (trainer.serve.RemotePolicy is the client)."""
    from trainer.policy import Policy
    from trainer.serve import ServeConfig, serve
    cfg = ServeConfig(host=host, port=port)
    policy = Policy.from_checkpoint(checkpoint, vq_path=vq_path, tokenizer_path=tokenizer_path,
                                    device=device)
    serve(policy, cfg)


def _image(path: Path):
    """A raw camera frame from a .npy (H, W, 3 uint8) or an image file PIL reads."""
    import numpy as np
    if path.suffix == ".npy":
        return _npy(path)
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except UnidentifiedImageError:
        raise RynnError(f"{path}: not an image file (give a .png/.jpg or an HxWx3 uint8 "
                        ".npy)") from None


def _npy(path: Path):
    import numpy as np
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as exc:
        raise RynnError(f"{path}: not a readable .npy array ({exc})") from None


def _vector(text: str, option: str = "--state"):
    import numpy as np
    if text.endswith(".npy"):
        return _npy(Path(text))
    try:
        return np.array([float(x) for x in text.split(",")])
    except ValueError:
        raise RynnError(f"{option} {text!r}: not comma-separated numbers (e.g. 0.1,0.2,0.3) or "
                        "a .npy file") from None


def _same_size(**frames) -> None:
    sizes = {name: tuple(f.shape[:2]) for name, f in frames.items() if f is not None}
    if len(set(sizes.values())) > 1:
        raise RynnError("camera frames differ in size ("
                        + ", ".join(f"--{k.replace('_', '-')} {h}x{w}" for k, (h, w) in
                                    sizes.items())
                        + "); give every camera frame at the size the robot records")


@app.command("act")
@friendly
def act_cmd(checkpoint: Path = typer.Option(..., help="Checkpoint (step dir, run dir or latest)."),
            instruction: str = typer.Option(..., help="Task instruction."),
            state: str = typer.Option(..., help="State: a .npy file or comma-separated values."),
            front: Path = typer.Option(..., help="Front camera frame (.png or .npy HxWx3 uint8), raw."),
            wrist: Path = typer.Option(..., help="Wrist camera frame, raw."),
            prev_front: Optional[Path] = typer.Option(None, help="Previous front frame (history)."),
            prev_wrist: Optional[Path] = typer.Option(None, help="Previous wrist frame (history)."),
            mode: str = typer.Option("continuous", help="continuous (action head) or discrete."),
            no_cache: bool = typer.Option(False, help="Discrete mode without the KV cache."),
            unconstrained: bool = typer.Option(
                False, help="Discrete mode: plain greedy decoding (the published decoder), "
                            "malformed output reported, instead of decoding under the grammar."),
            vq_path: Optional[str] = typer.Option(None, help="VQ-GAN weights (local path)."),
            tokenizer_path: Optional[str] = typer.Option(None, help="text_tokenizer.json path."),
            out: Optional[Path] = typer.Option(None, help="Write the K x D actions to this .npy.")) -> None:
    """Next K actions in the robot's units from a checkpoint and raw observations."""
    import numpy as np
    from trainer.card import MalformedActions
    from trainer.policy import Policy
    policy = Policy.from_checkpoint(checkpoint, vq_path=vq_path, tokenizer_path=tokenizer_path)
    prev = [_image(p) if p else None for p in (prev_front, prev_wrist)]
    now = [_image(front), _image(wrist)]
    _same_size(front=now[0], wrist=now[1], prev_front=prev[0], prev_wrist=prev[1])
    try:
        actions = policy.act(instruction, _vector(state), now[0], now[1],
                             prev_front=prev[0], prev_wrist=prev[1], mode=mode,
                             use_cache=not no_cache, constrained=not unconstrained)
    except MalformedActions as exc:
        for problem in exc.problems:
            console.print(f"[red]malformed[/]: {escape(str(problem))}")
        raise typer.Exit(1) from None
    if out is not None:
        np.save(out, actions)
    np.set_printoptions(precision=4, suppress=True)
    print(actions)


@app.command("imagine")
@friendly
def imagine_cmd(checkpoint: Path = typer.Option(..., help="Checkpoint (step dir, run dir or latest)."),
                out: Path = typer.Option(Path("imagined"), "--out", "-o", help="Directory for PNGs."),
                front: Optional[Path] = typer.Option(None, help="Front frame (.png/.npy), raw."),
                wrist: Optional[Path] = typer.Option(None, help="Wrist frame (.png/.npy), raw."),
                action: Optional[str] = typer.Option(None, help="Action: .npy or comma-separated."),
                steps: int = typer.Option(1, help="Frames to generate (rollout length)."),
                rollout: bool = typer.Option(False, help="Roll out along a held-out trajectory."),
                shards: Optional[Path] = typer.Option(None, help="Shards for --rollout."),
                episode: Optional[str] = typer.Option(None, help="Episode for --rollout."),
                start: int = typer.Option(0, help="First step for --rollout."),
                temperature: float = typer.Option(0.0, help="0 = greedy."),
                seed: int = typer.Option(0, help="Sampling seed."),
                vq_path: Optional[str] = typer.Option(None, help="VQ-GAN weights (local path)."),
                tokenizer_path: Optional[str] = typer.Option(None, help="text_tokenizer.json path.")) -> None:
    """World model: generate the next frame(s) from images and an action, decode them to PNGs."""
    from trainer.policy import Policy
    from trainer.world_model import imagine, rollout as do_rollout
    policy = Policy.from_checkpoint(checkpoint, vq_path=vq_path, tokenizer_path=tokenizer_path)
    if rollout:
        if shards is None:
            raise RynnError("--rollout needs --shards DIR (a held-out trajectory is read from it)")
        result = do_rollout(policy, shards, steps=steps, out=out, episode=episode, start=start)
    else:
        if front is None or wrist is None or action is None:
            raise RynnError("imagine needs --front, --wrist and --action (or --rollout --shards)")
        result = imagine(policy, _image(front), _image(wrist), _vector(action, "--action"),
                         steps=steps, out=out, temperature=temperature, seed=seed)
    console.print(f"wrote images to {out}")
    del result


@app.command("eval")
@friendly
def eval_cmd(checkpoint: Path = typer.Option(..., help="Checkpoint (step dir, run dir or latest)."),
             shards: Path = typer.Option(..., help="Shard directory (its held-out split is used)."),
             out: Path = typer.Option(Path("eval"), "--out", "-o", help="Report directory."),
             max_samples: int = typer.Option(32, help="VLA/WM samples for teacher-forced metrics."),
             max_discrete: int = typer.Option(16, help="Samples decoded in discrete mode."),
             max_generate: int = typer.Option(4, help="World-model frames generated and decoded."),
             vq_path: Optional[str] = typer.Option(None, help="VQ-GAN weights (local path)."),
             tokenizer_path: Optional[str] = typer.Option(None, help="text_tokenizer.json path."),
             lpips_weights: Optional[Path] = typer.Option(
                 None, help="Directory with LPIPS v0.1 weights (alex.pth or vgg.pth + the "
                            "torchvision backbone .pth); LPIPS is skipped without it."),
             lpips_net: Optional[str] = typer.Option(
                 None, help="alex or vgg: the LPIPS network when --lpips-weights holds both "
                            "(the lpips package's weights/v0.1 folder)."),
             fvd_weights: Optional[Path] = typer.Option(
                 None, help="TorchScript I3D detector (i3d_torchscript.pt); FVD is skipped "
                            "without it."),
             fvd_videos: int = typer.Option(8, help="Held-out trajectories rolled out for FVD."),
             fvd_frames: int = typer.Option(16, help="Frames per FVD video.")) -> None:
    """Held-out metrics: action L1/MSE (both modes), token accuracy, PSNR/SSIM (LPIPS with
    --lpips-weights, FVD with --fvd-weights); JSON + plots."""
    from trainer.evaluate import evaluate
    report = evaluate(checkpoint, shards, out, max_samples=max_samples, max_discrete=max_discrete,
                      max_generate=max_generate, vq_path=vq_path, tokenizer_path=tokenizer_path,
                      lpips_weights=lpips_weights, lpips_net=lpips_net, fvd_weights=fvd_weights,
                      fvd_videos=fvd_videos, fvd_frames=fvd_frames)
    console.print(escape(json.dumps(_headline(report), indent=1, default=str)))
    console.print(f"report: {out / 'report.json'}")


@app.command("rollout")
@friendly
def rollout_cmd(env: str = typer.Option("demo", help="Environment: demo, robosuite:<Task>, libero:<suite>."),
                policy: str = typer.Option(..., help="Checkpoint (run dir, latest or step dir), or a "
                                                     "baseline: expert, replay, mean."),
                episodes: int = typer.Option(10, help="Seeded episodes per task."),
                seed: int = typer.Option(0, help="First seed (episodes use seed .. seed + N x tasks - 1)."),
                mode: str = typer.Option("continuous", help="continuous (action head) or discrete."),
                procs: int = typer.Option(1, help="Env processes running at once."),
                out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
                videos: int = typer.Option(0, help="Write mp4 videos of the first N episodes."),
                shards: Optional[Path] = typer.Option(None, help="Stats for `mean`: shard dir or checkpoint."),
                unconstrained: bool = typer.Option(False, help="Discrete mode: plain greedy decoding."),
                execute: Optional[int] = typer.Option(None, help="Actions executed per policy call (default: all K)."),
                vq_path: Optional[str] = typer.Option(None, help="VQ-GAN weights (local path)."),
                tokenizer_path: Optional[str] = typer.Option(None, help="text_tokenizer.json path.")) -> None:
    """Run a policy or a baseline in an environment: success rate per task with 95% intervals."""
    from sim.rollout import RolloutConfig, rollout
    cfg = RolloutConfig(env=env, policy=policy, out=out, episodes=episodes, seed=seed, mode=mode,
                        procs=procs, videos=videos, shards=shards, vq_path=vq_path,
                        tokenizer_path=tokenizer_path, constrained=not unconstrained,
                        execute=execute)
    rollout(cfg)
    console.print(f"summary: {out / 'summary.json'}")


def _headline(report: dict) -> dict:
    keys = ("split", "held_out", "continuous", "discrete", "world_model")
    return {k: report[k] for k in keys if k in report}


def main() -> None:
    passive_openmp()        # before torch loads: idle OpenMP threads sleep (pipeline/threads.py)
    try:
        app()
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
