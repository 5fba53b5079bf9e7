"""Real-physics demonstrations: run an environment's scripted expert, write LIBERO raw-release HDF5.

Episode attempt i is `env.reset(seed + i)`; the expert acts (plus Gaussian action noise on the six
arm dimensions when `noise > 0`, seeded by (seed, i)) until the episode ends. Only successful
episodes are kept, as demo_0..demo_{n-1} in attempt order; the attempts that failed are reported
(never silently dropped), and too many failures is an error. The file is exactly what
`sim.demo_data` writes for its raw flavour (same writer): obs[t] recorded after actions[t],
images bottom-row-first as the env returns them, `problem_info`/`env_args` on `data`, `model_file`
and `init_state` on each demo; one file per task, written atomically. Same arguments: same bytes.

    rynn-pipe sim-data --env robosuite:Lift --episodes 50 out/sim_lift/raw
    from sim.record import RecordConfig, record_demos
    result = record_demos(Path("out/sim_lift/raw"), RecordConfig(env="robosuite:Lift", episodes=5))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline.config import ConfigError
from sim.demo_data import Demo, write_demo, write_suite_attrs
from pipeline.io import atomic_open
from pipeline.progress import Progress
from sim.env import EnvError, Step, make_env


@dataclass(frozen=True, kw_only=True)
class RecordConfig:
    """What `record_demos` runs: env spec, kept episodes, seed, image size, action noise."""

    env: str = "robosuite:Lift"
    episodes: int = 20
    seed: int = 0
    size: int = 128
    noise: float = 0.0           # std of Gaussian noise on the 6 arm action dims (normalized units)
    max_failures: int | None = None   # failed attempts allowed; None: as many as episodes

    def __post_init__(self) -> None:
        checks = [(self.episodes >= 1, "episodes", "must be >= 1"),
                  (self.size >= 32, "size", "must be >= 32 (128 or 256 like LIBERO)"),
                  (0.0 <= self.noise <= 1.0, "noise", "must be in [0, 1] (normalized units)"),
                  (self.max_failures is None or self.max_failures >= 0, "max_failures",
                   "must be >= 0")]
        for ok, option, msg in checks:
            if not ok:
                raise ConfigError(f"sim-data --{option.replace('_', '-')}: {msg}")


@dataclass(frozen=True)
class RecordResult:
    path: Path
    kept_seeds: list[int]
    failed_seeds: list[int]
    steps: int


def _check_recordable(env) -> None:
    missing = [m for m in ("expert_action", "sim_state", "model_xml", "proprio")
               if not callable(getattr(env, m, None))]
    if missing:
        raise EnvError(f"{env.name} cannot record demonstrations (no {', '.join(missing)})")


def _episode(env, seed: int, noise: float, rng: np.random.Generator) -> tuple[Demo, bool]:
    """Run the expert for one episode; the demo's arrays and whether it succeeded."""
    env.reset(seed)
    init_state = env.sim_state()
    rows: dict[str, list] = {k: [] for k in ("actions", "states", "ee_pos", "ee_ori", "gripper",
                                             "joints", "quat", "front", "wrist")}
    step: Step | None = None
    while step is None or not step.done:
        action = np.asarray(env.expert_action(), dtype=np.float64).copy()
        if noise > 0:
            action[:6] = np.clip(action[:6] + rng.normal(0.0, noise, 6), -1.0, 1.0)
        step = env.step(action)
        proprio = env.proprio()
        for key, value in (("actions", action), ("states", env.sim_state()),
                           ("ee_pos", step.obs.state[:3]), ("ee_ori", step.obs.state[3:6]),
                           ("gripper", step.obs.state[6:8]), ("joints", proprio["joint_states"]),
                           ("quat", proprio["ee_quat"]), ("front", step.obs.front),
                           ("wrist", step.obs.wrist)):
            rows[key].append(value)
    return _demo(rows, init_state, env.model_xml(), step.success), step.success


def _demo(rows: dict[str, list], init_state: np.ndarray, model_file: str, success: bool) -> Demo:
    a = {k: np.stack(v) for k, v in rows.items()}
    n = len(a["actions"])
    rewards, dones = np.zeros(n, np.uint8), np.zeros(n, np.uint8)
    rewards[-1], dones[-1] = success, 1
    arrays = {"actions": a["actions"], "states": a["states"],
              "robot_states": np.concatenate([a["gripper"], a["ee_pos"], a["quat"]], 1),
              "rewards": rewards, "dones": dones, "obs/ee_pos": a["ee_pos"],
              "obs/ee_ori": a["ee_ori"], "obs/ee_states": np.concatenate([a["ee_pos"],
                                                                          a["ee_ori"]], 1),
              "obs/gripper_states": a["gripper"], "obs/joint_states": a["joints"],
              # Demo holds upright frames and the writer stores them rotated 180 degrees: hand it
              # the env's bottom-row-first frames turned upright, so the file keeps them as given.
              "obs/agentview_rgb": a["front"][:, ::-1, ::-1],
              "obs/eye_in_hand_rgb": a["wrist"][:, ::-1, ::-1]}
    return Demo(arrays=arrays, init_state=init_state, model_file=model_file)


def file_name(instruction: str) -> str:
    """LIBERO's raw-release naming: the instruction with `_` for spaces, then `_demo.hdf5`."""
    return instruction.strip().replace(" ", "_") + "_demo.hdf5"


def record_demos(out: Path, cfg: RecordConfig) -> RecordResult:
    """Record `cfg.episodes` successful expert episodes of `cfg.env` into one HDF5 file in `out`."""
    env = make_env(cfg.env, size=cfg.size)
    try:
        _check_recordable(env)
        return _record(env, Path(out), cfg)
    finally:
        env.close()


def _record(env, out: Path, cfg: RecordConfig) -> RecordResult:
    allowed = cfg.episodes if cfg.max_failures is None else cfg.max_failures
    instruction = env.reset(cfg.seed).instruction
    out.mkdir(parents=True, exist_ok=True)
    path = out / file_name(instruction)
    kept, failed, total, attempt = [], [], 0, 0
    with atomic_open(path, "w+b") as f, \
            h5py.File(f, "w", libver="earliest", track_order=True) as h5, \
            Progress(cfg.episodes, f"sim-data {env.name}") as bar:
        data = h5.create_group("data", track_order=True)
        while len(kept) < cfg.episodes:
            seed = cfg.seed + attempt
            demo, ok = _episode(env, seed, cfg.noise, np.random.default_rng([cfg.seed, attempt]))
            attempt += 1
            if not ok:
                failed.append(seed)
                if len(failed) > allowed:
                    raise EnvError(f"sim-data {env.name}: the expert failed {len(failed)} of "
                                   f"{attempt} episodes (seeds {failed}), more than the {allowed} "
                                   "allowed; lower --noise or raise --max-failures")
                continue
            write_demo(data, f"demo_{len(kept)}", demo, "raw")
            kept.append(seed)
            total += len(demo.arrays["actions"])
            bar.advance()
        task = env.name.split(":")[-1]
        write_suite_attrs(data, env_name=task, problem=f"robosuite_{task.lower()}",
                          instruction=instruction, size=cfg.size, num_demos=len(kept),
                          total=total)
    return RecordResult(path=path, kept_seeds=kept, failed_seeds=failed, steps=total)
