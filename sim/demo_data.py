"""Synthetic LIBERO-format demonstrations: a procedural pick-and-place task with real dynamics.

A gripper moves above a coloured block, descends, closes, carries the block onto a coloured plate,
opens and retreats. Actions are LIBERO's 7-d commands (6 normalized end-effector deltas in [-1, 1]:
xyz and axis-angle xyz, plus the gripper: exactly -1 open, +1 close); the end-effector position and
orientation are integrated from them, the block follows the closed gripper and falls onto whatever
is below it when released. Two numpy cameras render every state: a fixed front camera (oblique
orthographic view of the table) and a wrist camera centred on the gripper. Files follow SPEC.md 1.1
exactly, one per task (`<task_name>_demo.hdf5`), in either flavour:

- raw release: demo_0..demo_{n-1}; attributes on `data` (problem_info, env_args, tag, num_demos,
  total, ...) and on each demo (num_samples, init_state, model_file); obs[t] recorded AFTER
  actions[t]; idle no-op pauses (zero motion, unchanged gripper) inside demos.
- regenerated (no_noops): `<ROOM>_SCENE<n>_<task_name>_demo.hdf5`, no attributes at all, demo
  numbers with gaps (failed replays), obs[t] recorded BEFORE actions[t], no idle steps.

Images are stored bottom-row-first (the upright render rotated 180 degrees), as LIBERO stores them.
The output is byte-identical for the same arguments (no HDF5 timestamps, fixed object order).

One simulation, two uses: the writer and the closed-loop environment (`sim.demo_env`) share the
episode start (`scene`), the simulation step (`physics_step`), the observation (`ee_observation`,
`render`, `to_stored`) and the success test (`block_on_plate`), so the env and the data cannot
drift apart.

    rynn-pipe demo-data out/demo/raw --flavour raw --size 128 --tasks 3 --demos 4 --seed 0
    from sim.demo_data import write_demo_suite
    files = write_demo_suite(Path("demos"), flavour="regenerated", size=256)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline.config import ConfigError
from pipeline.io import atomic_open, npy_bytes, write_bytes
from stages.libero import instruction_from_filename

FLAVOURS = ("raw", "regenerated")
DT = 0.05              # control period (20 Hz)
MAX_STEP = 0.05        # metres moved per step at |action| = 1
MAX_ROT = 0.5          # radians turned per step at |action| = 1
ACTION_NOISE = 0.02    # teleoperation jitter on xyz, in normalized action units
HALF = 0.02            # block half side (m)
PLATE_R = 0.06         # plate radius (m)
PLATE_TOP = 0.01       # plate top height (m)
HOVER = 0.10           # carry height of the end effector (m)
TABLE = 0.30           # table half extent (m)
FINGER_OPEN = 0.04     # finger joint position when open (m)
GRASP_TOL = 0.015      # the closing gripper grasps a block whose centre is this close (m)
HOLD_STEPS = 3         # steps spent closing / opening the gripper
MIN_STEPS = 24
STEP_RANGE = (40, 61)  # episode length drawn per demo when `steps` is None

BLOCK_COLOURS = {"red": (205, 40, 40), "green": (40, 170, 60), "yellow": (230, 200, 40),
                 "purple": (130, 60, 170), "orange": (240, 130, 30)}
PLATE_COLOURS = {"blue": (50, 90, 210), "white": (235, 235, 235), "pink": (235, 140, 190),
                 "black": (35, 35, 35)}
ROOMS = ("KITCHEN", "LIVING_ROOM", "STUDY")
WALL, FLOOR, EDGE = (150, 170, 190), (70, 70, 80), (110, 80, 55)
WOOD, WOOD_LINE, RIM = (185, 145, 100), (160, 122, 82), (120, 120, 130)
ARM, PALM, FINGER = (200, 200, 205), (120, 120, 125), (55, 55, 60)

ELEVATION = np.deg2rad(55.0)           # front camera looks down at this angle
SIN_E, COS_E = np.sin(ELEVATION), np.cos(ELEVATION)
FRONT_WINDOW = (-0.36, 0.36, 0.40, -0.32)  # u left, u right, v top, v bottom (m)
WRIST_UP = 0.12                        # wrist camera height above the fingertips (m)
WRIST_FOCAL = 1.47                     # normalized focal length of the wrist camera
FINGER_T = 0.006                       # finger half thickness (m)
# A fixed linear map standing in for the arm's inverse kinematics (joint_states).
JOINT_HOME = np.array([0.0, -0.3, 0.0, -2.3, 0.0, 2.0, 0.8])
JOINT_MIX = np.random.default_rng(1234).normal(0.0, 0.6, (6, 7))


@dataclass(frozen=True)
class Task:
    """One task (one file): put the `block` block on the `plate` plate, maybe with a distractor."""

    index: int
    block: str
    plate: str
    distractor: str | None

    @property
    def instruction(self) -> str:
        return f"put the {self.block} block on the {self.plate} plate"

    def file_name(self, flavour: str) -> str:
        stem = self.instruction.replace(" ", "_")
        if flavour == "regenerated":
            stem = f"{ROOMS[self.index % len(ROOMS)]}_SCENE{self.index + 1}_{stem}"
        return f"{stem}_demo.hdf5"


@dataclass(frozen=True)
class Demo:
    """One demonstration: dataset path -> array (images UPRIGHT, as rendered) and the initial
    simulator state. `write_demo_suite` stores the images rotated 180 degrees."""

    arrays: dict[str, np.ndarray]
    init_state: np.ndarray
    model_file: str = "<mujoco model=\"demo_tabletop\"></mujoco>"   # the scene's MJCF


def task_list(n: int) -> list[Task]:
    """The first n tasks: every (block, plate) colour pair once, consecutive tasks differing."""
    blocks, plates = list(BLOCK_COLOURS), list(PLATE_COLOURS)
    out = []
    for k in range(n):
        b, p = k % len(blocks), (k // len(blocks) + k) % len(plates)
        distractor = blocks[(b + 2) % len(blocks)] if k % 2 else None
        out.append(Task(index=k, block=blocks[b], plate=plates[p], distractor=distractor))
    return out


# ---------------------------------------------------------------------------------------------
# Rotations (quaternions x, y, z, w as robosuite stores them)
# ---------------------------------------------------------------------------------------------

def _quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ax, ay, az, aw = a
    bx, by, bz, bw = b
    return np.array([aw * bx + ax * bw + ay * bz - az * by,
                     aw * by + ay * bw + az * bx - ax * bz,
                     aw * bz + az * bw + ax * by - ay * bx,
                     aw * bw - ax * bx - ay * by - az * bz])


def _rotvec_to_quat(r: np.ndarray) -> np.ndarray:
    angle = float(np.linalg.norm(r))
    if angle < 1e-12:
        return np.array([0.0, 0.0, 0.0, 1.0])
    return np.append(np.asarray(r) / angle * np.sin(angle / 2), np.cos(angle / 2))


def quat_to_rotvec(q: np.ndarray) -> np.ndarray:
    """(N, 4) xyzw -> (N, 3) axis-angle, robosuite's convention (angle 2*acos(w), no sign flip,
    so a gripper pointing down stays near (pi, 0, 0) without jumping)."""
    w = np.clip(q[:, 3], -1.0, 1.0)
    den = np.sqrt(1.0 - w * w)
    scale = np.divide(2.0 * np.arccos(w), den, out=np.zeros_like(den), where=den > 1e-9)
    return q[:, :3] * scale[:, None]


# ---------------------------------------------------------------------------------------------
# Scene layout and the action schedule
# ---------------------------------------------------------------------------------------------

def scene(task: Task, number: int, seed: int) -> tuple[dict[str, np.ndarray], np.random.Generator]:
    """The object layout and start pose of demo `number` of `task` (the generator goes on to draw
    the rest of the demo: its length, plan, pauses and jitter)."""
    rng = np.random.default_rng([seed, task.index, number])
    return _layout(task, rng), rng


def _layout(task: Task, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Object positions (at least 13 cm apart) and the end effector's start pose."""
    names = ["block", "plate"] + (["distractor"] if task.distractor else [])
    while True:
        xy = rng.uniform(-0.2, 0.2, (len(names), 2))
        gaps = np.linalg.norm(xy[:, None] - xy[None], axis=-1) + np.eye(len(names))
        if gaps.min() >= 0.13:
            break
    heights = {"block": HALF, "plate": PLATE_TOP / 2, "distractor": HALF}
    out = {name: np.append(p, heights[name]) for name, p in zip(names, xy)}
    out["ee"] = np.array([0.0, -0.05, 0.2]) + rng.uniform(-0.02, 0.02, 3)
    down = np.array([1.0, 0.0, 0.0, 0.0])  # rotation by pi about x: the gripper points down
    out["quat"] = _quat_mul(_rotvec_to_quat([0.0, 0.0, rng.uniform(-0.2, 0.2)]), down)
    return out


def _waypoints(layout: dict[str, np.ndarray]) -> list[tuple[np.ndarray | None, float]]:
    """(end point or None for "hold still", gripper command) per segment of the task."""
    bx, by = layout["block"][:2]
    px, py = layout["plate"][:2]
    place = PLATE_TOP + HALF + 0.005
    return [((bx, by, HOVER), -1.0), ((bx, by, HALF), -1.0), (None, 1.0), ((bx, by, HOVER), 1.0),
            ((px, py, HOVER), 1.0), ((px, py, place), 1.0), (None, -1.0),
            ((px, py, HOVER + 0.05), -1.0)]


def _allocate(lengths: np.ndarray, total: int, minimum: int = 2) -> np.ndarray:
    """Split `total` steps over segments in proportion to their lengths (largest remainder)."""
    extra = total - minimum * len(lengths)
    share = lengths / lengths.sum() * extra
    n = np.floor(share).astype(int)
    n[np.argsort(n - share, kind="stable")[: extra - n.sum()]] += 1
    return n + minimum


def _plan(layout: dict[str, np.ndarray], moving: int, rng: np.random.Generator
          ) -> dict[str, np.ndarray]:
    """Per moving step: segment end point, steps left in the segment, gripper, wobble."""
    segments = _waypoints(layout)
    points, prev = [], layout["ee"]
    for point, _ in segments:
        prev = prev if point is None else np.array(point, dtype=float)
        points.append(prev)
    grips = [grip for _, grip in segments]
    holds = np.array([point is None for point, _ in segments])
    dist = np.linalg.norm(np.diff(np.array([layout["ee"], *points]), axis=0), axis=1)
    counts = np.full(len(points), HOLD_STEPS)
    counts[~holds] = _allocate(dist[~holds], moving - HOLD_STEPS * int(holds.sum()))
    remaining = np.concatenate([np.arange(n, 0, -1) for n in counts])
    return {"target": np.repeat(np.array(points), counts, axis=0), "remaining": remaining,
            "grip": np.repeat(grips, counts), "wobble": _wobble(len(remaining), rng)}


def _wobble(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3) small, bounded rotation deltas (radians per step) of a human hand."""
    amp = rng.uniform(0.003, 0.012, 3)
    freq = rng.uniform(0.15, 0.4, 3)
    phase = rng.uniform(0.0, 2 * np.pi, 3)
    return amp * np.sin(freq * np.arange(n)[:, None] + phase)


def _order(moving: int, idle: int, rng: np.random.Generator) -> np.ndarray:
    """Moving-step index per recorded step, -1 for idle steps (1-3 pauses at random places)."""
    if idle == 0:
        return np.arange(moving)
    pauses = min(int(rng.integers(1, 4)), idle)
    cuts = np.sort(rng.choice(np.arange(1, idle), pauses - 1, replace=False))
    lengths = np.diff(np.concatenate([[0], cuts, [idle]]))
    where = np.sort(rng.integers(0, moving + 1, pauses))
    return np.insert(np.arange(moving), np.repeat(where, lengths), -1)


# ---------------------------------------------------------------------------------------------
# Dynamics
# ---------------------------------------------------------------------------------------------

@dataclass
class Body:
    """The moving state of the world: end effector, finger opening, the block and the grasp."""

    pos: np.ndarray
    quat: np.ndarray
    finger: float
    block: np.ndarray
    held: bool = False

    @classmethod
    def at_start(cls, layout: dict[str, np.ndarray]) -> "Body":
        return cls(pos=layout["ee"].copy(), quat=layout["quat"], finger=FINGER_OPEN,
                   block=layout["block"].copy())

    def snapshot(self) -> dict[str, np.ndarray]:
        return {"ee_pos": self.pos.copy(), "ee_quat": self.quat.copy(),
                "finger": np.float64(self.finger), "block": self.block.copy()}


def _command(step: int, pos: np.ndarray, grip: float, plan: dict[str, np.ndarray],
             noise: np.ndarray) -> np.ndarray:
    """The 7-d action: a closed-loop move towards the segment end, or an exact no-op."""
    if step < 0:
        return np.array([0.0] * 6 + [grip])
    xyz = (plan["target"][step] - pos) / plan["remaining"][step] / MAX_STEP + noise
    rot = plan["wobble"][step] / MAX_ROT
    return np.concatenate([np.clip(xyz, -1, 1), np.clip(rot, -1, 1), [plan["grip"][step]]])


def _support(p: np.ndarray, layout: dict[str, np.ndarray]) -> float:
    """Resting height of a block centre at p: on the plate or on the table."""
    on_plate = np.linalg.norm(p[:2] - layout["plate"][:2]) < PLATE_R
    return PLATE_TOP + HALF if on_plate else HALF


def physics_step(body: Body, action: np.ndarray, layout: dict[str, np.ndarray]) -> None:
    """Advance the world by one 7-d action (in place)."""
    body.pos = body.pos + action[:3] * MAX_STEP
    body.quat = _quat_mul(_rotvec_to_quat(action[3:6] * MAX_ROT), body.quat)
    closing = action[6] > 0
    near = np.linalg.norm(body.pos - body.block) < GRASP_TOL
    body.held = bool(closing and (body.held or near))
    goal = (HALF if body.held else 0.0) if closing else FINGER_OPEN
    body.finger += 0.5 * (goal - body.finger)
    if body.held:
        body.block = body.pos.copy()
    else:
        body.block[2] = max(_support(body.block, layout), body.block[2] - 0.02)


def _simulate(order: np.ndarray, plan: dict[str, np.ndarray], layout: dict[str, np.ndarray],
              rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(actions (T, 7), trace of T+1 states: before the first action ... after the last)."""
    body = Body.at_start(layout)
    noise = rng.normal(0.0, ACTION_NOISE, (len(order), 3))
    actions, trace, grip = [], [body.snapshot()], -1.0
    for t, step in enumerate(order):
        action = _command(int(step), body.pos, grip, plan, noise[t])
        grip = action[6]
        physics_step(body, action, layout)
        actions.append(action)
        trace.append(body.snapshot())
    return np.array(actions), {k: np.array([s[k] for s in trace]) for k in trace[0]}


# ---------------------------------------------------------------------------------------------
# Low-dimensional arrays
# ---------------------------------------------------------------------------------------------

def _objects(trace: dict[str, np.ndarray], layout: dict[str, np.ndarray]) -> list[np.ndarray]:
    n = len(trace["block"])
    still = [np.tile(layout[k], (n, 1)) for k in ("plate", "distractor") if k in layout]
    return [trace["block"], *still]


def _sim_states(trace: dict[str, np.ndarray], joints: np.ndarray, gripper: np.ndarray,
                layout: dict[str, np.ndarray]) -> np.ndarray:
    """Flattened simulator state [time, qpos, qvel]: its width depends on the scene's objects."""
    n = len(joints)
    objects = _objects(trace, layout)
    upright = np.tile([1.0, 0.0, 0.0, 0.0], (n, 1))  # object quaternions (w, x, y, z)

    def vel(x: np.ndarray) -> np.ndarray:
        return np.gradient(x, DT, axis=0)

    qpos = [joints, gripper, *[np.concatenate([p, upright], 1) for p in objects]]
    qvel = [vel(joints), vel(gripper), *[np.concatenate([vel(p), np.zeros((n, 3))], 1)
                                         for p in objects]]
    return np.concatenate([np.arange(n)[:, None] * DT, *qpos, *qvel], 1)


def block_on_plate(block: np.ndarray, layout: dict[str, np.ndarray]) -> bool:
    """The task's success: the block rests on the plate."""
    return bool(abs(block[2] - PLATE_TOP - HALF) < 1e-6
                and np.linalg.norm(block[:2] - layout["plate"][:2]) < PLATE_R)


def ee_observation(trace: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """(T, .) end-effector position, axis-angle orientation and gripper qpos of trace states:
    the dataset's obs/ee_pos, obs/ee_ori, obs/gripper_states (the model state, concatenated)."""
    return {"ee_pos": trace["ee_pos"], "ee_ori": quat_to_rotvec(trace["ee_quat"]),
            "gripper_states": np.stack([trace["finger"], -trace["finger"]], 1)}


def _low_dim(trace: dict[str, np.ndarray], actions: np.ndarray, layout: dict[str, np.ndarray],
             rows: slice) -> tuple[dict[str, np.ndarray], np.ndarray]:
    pos, quat = trace["ee_pos"], trace["ee_quat"]
    ee = ee_observation(trace)
    ori, gripper = ee["ee_ori"], ee["gripper_states"]
    joints = JOINT_HOME + np.concatenate([pos, ori - np.array([np.pi, 0, 0])], 1) @ JOINT_MIX
    sim = _sim_states(trace, joints, gripper, layout)
    n = len(actions)
    rewards = np.zeros(n, np.uint8)
    rewards[-1] = block_on_plate(trace["block"][-1], layout)
    dones = np.zeros(n, np.uint8)
    dones[-1] = 1
    arrays = {"actions": actions, "states": sim[rows],
              "robot_states": np.concatenate([gripper, pos, quat], 1)[rows],
              "rewards": rewards, "dones": dones, "obs/ee_pos": pos[rows], "obs/ee_ori": ori[rows],
              "obs/ee_states": np.concatenate([pos, ori], 1)[rows],
              "obs/gripper_states": gripper[rows], "obs/joint_states": joints[rows]}
    return arrays, sim[0]


# ---------------------------------------------------------------------------------------------
# Rendering (vectorized over time: masks are (T, H, W) from (T, 1, 1) shape parameters)
# ---------------------------------------------------------------------------------------------

def _c(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)[:, None, None]


def _rect(U, V, u0, u1, v0, v1) -> np.ndarray:
    return (U >= _c(u0)) & (U <= _c(u1)) & (V >= _c(v0)) & (V <= _c(v1))


def _ellipse(U, V, cu, cv, ru, rv) -> np.ndarray:
    return ((U - _c(cu)) / _c(ru)) ** 2 + ((V - _c(cv)) / _c(rv)) ** 2 <= 1.0


def _paint(img: np.ndarray, mask: np.ndarray, rgb: tuple[int, int, int]) -> None:
    img[np.broadcast_to(mask, img.shape[:3])] = rgb


def _shade(img: np.ndarray, mask: np.ndarray, factor: float = 0.7) -> None:
    mask = np.broadcast_to(mask, img.shape[:3])
    img[mask] = (img[mask] * factor).astype(np.uint8)


def _dim(rgb: tuple[int, int, int]) -> tuple[int, ...]:
    return tuple(int(v * 0.65) for v in rgb)


def _table(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Colours of the world plane z=0 at (X, Y): wood with a 10 cm grid, floor off the table."""
    on = (np.abs(X) <= TABLE) & (np.abs(Y) <= TABLE)
    line = on & ((np.abs(X / 0.1 - np.round(X / 0.1)) < 0.06)
                 | (np.abs(Y / 0.1 - np.round(Y / 0.1)) < 0.06))
    img = np.empty((*np.broadcast_shapes(X.shape, Y.shape), 3), np.uint8)
    img[...] = FLOOR
    _paint(img, on, WOOD)
    _paint(img, line, WOOD_LINE)
    return img


def _grid(size: int, left: float, right: float, top: float, bottom: float):
    """Pixel-centre coordinates: U (1, 1, W) to the right, V (1, H, 1) upwards (row 0 on top)."""
    centres = (np.arange(size) + 0.5) / size
    U = left + centres * (right - left)
    V = top - centres * (top - bottom)
    return U[None, None, :], V[None, :, None]


def _front_v(p: np.ndarray, dz: float = 0.0) -> np.ndarray:
    return p[:, 1] * SIN_E + (p[:, 2] + dz) * COS_E


def _on_ground(p: np.ndarray) -> np.ndarray:
    """Where a point's shadow falls (light from straight above)."""
    return p * np.array([1.0, 1.0, 0.0])


def _front_background(n: int, U, V) -> np.ndarray:
    img = _table(U, V / SIN_E)
    _paint(img, V > TABLE * SIN_E, WALL)
    _paint(img, (V < -TABLE * SIN_E) & (V >= -TABLE * SIN_E - 0.03) & (np.abs(U) <= TABLE), EDGE)
    return np.repeat(img, n, axis=0)


def _front_disc(U, V, p: np.ndarray, r: float) -> np.ndarray:
    r = np.full(len(p), r)
    return _ellipse(U, V, p[:, 0], _front_v(p), r, r * SIN_E)


def _front_box(img, U, V, p: np.ndarray, rgb) -> None:
    """A cube seen from the front: its front face (darker), then its top face."""
    y0, y1, z1 = p[:, 1] - HALF, p[:, 1] + HALF, p[:, 2] + HALF
    u0, u1 = p[:, 0] - HALF, p[:, 0] + HALF
    _paint(img, _rect(U, V, u0, u1, y0 * SIN_E + (z1 - 2 * HALF) * COS_E, y0 * SIN_E + z1 * COS_E),
           _dim(rgb))
    _paint(img, _rect(U, V, u0, u1, y0 * SIN_E + z1 * COS_E, y1 * SIN_E + z1 * COS_E), rgb)


def _front_gripper(img, U, V, pos: np.ndarray, finger: np.ndarray) -> None:
    x = pos[:, 0]
    _paint(img, _rect(U, V, x - 0.012, x + 0.012, _front_v(pos, 0.045), _front_v(pos, 0.13)), ARM)
    _paint(img, _rect(U, V, x - finger - 0.02, x + finger + 0.02, _front_v(pos, 0.03),
                      _front_v(pos, 0.045)), PALM)
    for side in (-1.0, 1.0):
        cx = x + side * (finger + FINGER_T)
        _paint(img, _rect(U, V, cx - FINGER_T, cx + FINGER_T, _front_v(pos, -0.015),
                          _front_v(pos, 0.03)), FINGER)


def _render_front(view: dict[str, np.ndarray], task: Task, layout: dict[str, np.ndarray],
                  size: int) -> np.ndarray:
    """(T, size, size, 3) upright front-camera frames."""
    n = len(view["ee_pos"])
    U, V = _grid(size, *FRONT_WINDOW)
    img = _front_background(n, U, V)
    plate = np.tile(layout["plate"], (n, 1))
    _paint(img, _front_disc(U, V, plate, PLATE_R + 0.008), RIM)
    _paint(img, _front_disc(U, V, plate, PLATE_R), PLATE_COLOURS[task.plate])
    _shade(img, _front_disc(U, V, _on_ground(view["ee_pos"]), 0.03))
    lifted = (view["block"][:, 2] > 0.04)[:, None, None]
    _shade(img, _front_disc(U, V, _on_ground(view["block"]), 0.025) & lifted)
    if task.distractor:
        _front_box(img, U, V, np.tile(layout["distractor"], (n, 1)), BLOCK_COLOURS[task.distractor])
    _front_box(img, U, V, view["block"], BLOCK_COLOURS[task.block])
    _front_gripper(img, U, V, view["ee_pos"], view["finger"])
    return img


def _wrist_project(p: np.ndarray, pos: np.ndarray):
    """Normalized image centre (a right, b up) and pixels-per-metre scale of points p."""
    scale = WRIST_FOCAL / np.maximum(pos[:, 2] + WRIST_UP - p[:, 2], 0.02)
    return (p[:, 0] - pos[:, 0]) * scale, (p[:, 1] - pos[:, 1]) * scale, scale


def _wrist_square(img, A, B, p: np.ndarray, pos: np.ndarray, rgb) -> None:
    a, b, s = _wrist_project(p + np.array([0.0, 0.0, HALF]), pos)
    _paint(img, _rect(A, B, a - HALF * s, a + HALF * s, b - HALF * s, b + HALF * s), rgb)


def _render_wrist(view: dict[str, np.ndarray], task: Task, layout: dict[str, np.ndarray],
                  size: int) -> np.ndarray:
    """(T, size, size, 3) upright wrist-camera frames: looking down from above the fingers."""
    pos, n = view["ee_pos"], len(view["ee_pos"])
    A, B = _grid(size, -1.0, 1.0, 1.0, -1.0)
    reach = (pos[:, 2] + WRIST_UP) / WRIST_FOCAL
    img = _table(_c(pos[:, 0]) + A * _c(reach), _c(pos[:, 1]) + B * _c(reach))
    plate = np.tile(layout["plate"], (n, 1))
    a, b, s = _wrist_project(plate + np.array([0.0, 0.0, PLATE_TOP / 2]), pos)
    _paint(img, _ellipse(A, B, a, b, (PLATE_R + 0.008) * s, (PLATE_R + 0.008) * s), RIM)
    _paint(img, _ellipse(A, B, a, b, PLATE_R * s, PLATE_R * s), PLATE_COLOURS[task.plate])
    if task.distractor:
        _wrist_square(img, A, B, np.tile(layout["distractor"], (n, 1)), pos,
                      BLOCK_COLOURS[task.distractor])
    _wrist_square(img, A, B, view["block"], pos, BLOCK_COLOURS[task.block])
    for side in (-1.0, 1.0):
        centre = side * (0.15 + 0.35 * view["finger"] / FINGER_OPEN)
        _paint(img, _rect(A, B, centre - 0.1, centre + 0.1, np.full(n, -1.0), np.full(n, -0.55)),
               FINGER)
    return img


def render(view: dict[str, np.ndarray], task: Task, layout: dict[str, np.ndarray],
           size: int) -> tuple[np.ndarray, np.ndarray]:
    """Upright (T, size, size, 3) front and wrist frames of T states (`Body.snapshot` arrays)."""
    return _render_front(view, task, layout, size), _render_wrist(view, task, layout, size)


def to_stored(frames: np.ndarray) -> np.ndarray:
    """Upright frame(s) (..., H, W, 3) -> bottom-row-first, as LIBERO stores them."""
    return np.ascontiguousarray(frames[..., ::-1, ::-1, :])


# ---------------------------------------------------------------------------------------------
# One demo, one file, the suite
# ---------------------------------------------------------------------------------------------

def demo_episode(task: Task, number: int, *, flavour: str = "raw", seed: int = 0,
                 steps: int | None = None
                 ) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray]]:
    """(layout, actions (T, 7), trace of T+1 states) of demo `number` of `task`, unrendered."""
    layout, rng = scene(task, number, seed)
    n = steps or int(rng.integers(*STEP_RANGE))
    idle = max(2, round(n * rng.uniform(0.08, 0.16))) if flavour == "raw" else 0
    plan = _plan(layout, n - idle, rng)
    actions, trace = _simulate(_order(n - idle, idle, rng), plan, layout, rng)
    return layout, actions, trace


def demo_arrays(task: Task, number: int, *, flavour: str = "raw", size: int = 128, seed: int = 0,
                steps: int | None = None) -> Demo:
    """Simulate and render demo `number` of `task` (deterministic in seed, task and number)."""
    layout, actions, trace = demo_episode(task, number, flavour=flavour, seed=seed, steps=steps)
    # raw release: obs[t] is the state AFTER actions[t]; regenerated: the state before it.
    rows = slice(1, None) if flavour == "raw" else slice(0, -1)
    arrays, init_state = _low_dim(trace, actions, layout, rows)
    view = {k: v[rows] for k, v in trace.items()}
    arrays["obs/agentview_rgb"], arrays["obs/eye_in_hand_rgb"] = render(view, task, layout, size)
    return Demo(arrays=arrays, init_state=init_state)


def demo_numbers(demos: int, flavour: str, rng: np.random.Generator) -> list[int]:
    """raw: 0..demos-1. regenerated: failed replays leave gaps (demo 1 always "fails")."""
    if flavour == "raw":
        return list(range(demos))
    numbers, i = [], 0
    while len(numbers) < demos:
        if i == 0 or (i != 1 and rng.random() > 0.25):
            numbers.append(i)
        i += 1
    return numbers


def write_demo(data: h5py.Group, key: str, demo: Demo, flavour: str) -> None:
    """One `data/<key>` group: arrays (images stored bottom-row-first), raw-release attributes."""
    group = data.create_group(key, track_order=True)
    for name, arr in demo.arrays.items():
        if name.endswith("_rgb"):
            group.create_dataset(name, data=to_stored(arr), chunks=(1, *arr.shape[1:]),
                                 compression="gzip", compression_opts=4, track_times=False)
        else:
            group.create_dataset(name, data=arr, track_times=False)
    if flavour == "raw":
        group.attrs["num_samples"] = len(demo.arrays["actions"])
        group.attrs["init_state"] = demo.init_state
        group.attrs["model_file"] = demo.model_file


def _suite_attrs(data: h5py.Group, task: Task, size: int, num_demos: int, total: int) -> None:
    """The attributes the raw release puts on `data`."""
    bddl = f"libero/bddl_files/demo/{task.file_name('raw').removesuffix('_demo.hdf5')}.bddl"
    write_suite_attrs(data, env_name="Libero_Tabletop_Manipulation",
                      problem="libero_tabletop_manipulation", instruction=task.instruction,
                      size=size, num_demos=num_demos, total=total, bddl=bddl)


def write_suite_attrs(data: h5py.Group, *, env_name: str, problem: str, instruction: str,
                      size: int, num_demos: int, total: int, bddl: str | None = None) -> None:
    """LIBERO raw-release attributes on `data` (problem_info, env_args, ...); `bddl` is the
    task's BDDL file where the scene has one."""
    env_kwargs = {"robots": ["Panda"], "controller": "OSC_POSE", "control_freq": int(1 / DT),
                  "camera_names": ["agentview", "robot0_eye_in_hand"],
                  "camera_heights": size, "camera_widths": size}
    env_args = {"type": 1, "env_name": env_name, "problem_name": problem, "env_kwargs": env_kwargs}
    if bddl is not None:
        env_kwargs["bddl_file_name"] = bddl
        env_args["bddl_file"] = bddl
        data.attrs["bddl_file_name"] = bddl
    data.attrs["env_args"] = json.dumps(env_args, sort_keys=True)
    data.attrs["env_name"] = env_name
    data.attrs["macros_image_convention"] = "opengl"
    data.attrs["num_demos"] = num_demos
    data.attrs["problem_info"] = json.dumps({"problem_name": problem, "domain_name": "robosuite",
                                             "language_instruction": instruction})
    data.attrs["tag"] = "libero-v1"
    data.attrs["total"] = total


def _write_task_file(out: Path, task: Task, *, flavour: str, size: int, demos: int, seed: int,
                     steps: int | None) -> Path:
    path = out / task.file_name(flavour)
    numbers = demo_numbers(demos, flavour, np.random.default_rng([seed, task.index, 1_000_003]))
    with atomic_open(path, "w+b") as f, \
            h5py.File(f, "w", libver="earliest", track_order=True) as h5:
        data = h5.create_group("data", track_order=True)
        total = 0
        for number in numbers:
            demo = demo_arrays(task, number, flavour=flavour, size=size, seed=seed, steps=steps)
            write_demo(data, f"demo_{number}", demo, flavour)
            total += len(demo.arrays["actions"])
        if flavour == "raw":
            _suite_attrs(data, task, size, len(numbers), total)
    return path


def _check_args(flavour: str, size: int, tasks: int, demos: int, steps: int | None) -> None:
    most = len(BLOCK_COLOURS) * len(PLATE_COLOURS)
    checks = [(flavour in FLAVOURS, "flavour", f"got {flavour!r}; choose one of {list(FLAVOURS)}"),
              (size >= 32, "size", f"got {size}; use at least 32 (128 or 256 like LIBERO)"),
              (1 <= tasks <= most, "tasks", f"got {tasks}; choose 1..{most}"),
              (demos >= 1, "demos", f"got {demos}; choose at least 1"),
              (steps is None or steps >= MIN_STEPS, "steps", f"got {steps}; use >= {MIN_STEPS}")]
    for ok, option, msg in checks:
        if not ok:
            raise ConfigError(f"demo-data --{option}: {msg}")


def write_demo_suite(out: Path, *, flavour: str = "raw", size: int = 128, tasks: int = 3,
                     demos: int = 4, seed: int = 0, steps: int | None = None) -> list[Path]:
    """Write `tasks` LIBERO HDF5 files of `demos` demos each into `out`; return their paths.

    `steps`: recorded steps per demo (raw: idle pauses included); None draws 40..60 per demo.
    Each file is written to a temporary name and renamed, so a killed run leaves no half file.
    """
    _check_args(flavour, size, tasks, demos, steps)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return [_write_task_file(out, task, flavour=flavour, size=size, demos=demos, seed=seed,
                             steps=steps) for task in task_list(tasks)]


def export_observation(raw: Path, out: Path, *, step: int = 5) -> dict[str, Path]:
    """Write one raw observation of the first demo of the first task file, as a robot would give
    it (frames as stored, before any rotation), for trying `rynn-pipe act`:
    front.npy, wrist.npy, prev_front.npy, prev_wrist.npy (H, W, 3 uint8), state.npy (8,),
    instruction.txt."""
    src = sorted(Path(raw).glob("*.hdf5"))[0]
    with h5py.File(src, "r") as f:
        demo = f["data"][sorted(f["data"], key=lambda k: int(k.split("_")[1]))[0]]
        obs = demo["obs"]
        arrays = {"front": obs["agentview_rgb"][step], "wrist": obs["eye_in_hand_rgb"][step],
                  "prev_front": obs["agentview_rgb"][step - 1],
                  "prev_wrist": obs["eye_in_hand_rgb"][step - 1],
                  "state": np.concatenate([obs["ee_pos"][step], obs["ee_ori"][step],
                                           obs["gripper_states"][step]])}
        attrs = f["data"].attrs
        instruction = (json.loads(attrs["problem_info"])["language_instruction"]
                       if "problem_info" in attrs else instruction_from_filename(src.name))
    paths = {}
    for name, arr in arrays.items():
        paths[name] = Path(out) / f"{name}.npy"
        write_bytes(paths[name], npy_bytes(arr))
    paths["instruction"] = Path(out) / "instruction.txt"
    write_bytes(paths["instruction"], (instruction + "\n").encode())
    return paths
