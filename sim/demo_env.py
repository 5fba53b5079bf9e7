"""`demo`: the built-in procedural pick-and-place task as a closed-loop environment.

It steps the very simulation and renderer that write the demo suite (`sim.demo_data`:
`scene`, `physics_step`, `render`, `to_stored`, `ee_observation`, `block_on_plate`), so the env
and the data cannot drift apart: stepping it with a recorded demo's actions reproduces the
demo's frames exactly.

    from sim.env import make_env
    env = make_env("demo", size=128)        # "demo:5" plays the first 5 tasks
    obs = env.reset(seed=7)                 # task 7 % tasks, the layout of demo 7 // tasks
    while not (step := env.step(env.expert_action())).done:
        pass

Seeds: `reset(seed)` plays task `seed % tasks` (the suite's task order) in the layout of that
task's demo number `seed // tasks` of a suite written with `data_seed` (0: `rynn-pipe demo-data`'s
default). So with the defaults, seeds below tasks x demos are the training layouts of a default
suite (3 x 4 = 12); pick seeds above them (e.g. 1000) for layouts the model never saw.
Observations are bottom-row-first like the HDF5 files; the state is the dataset's 8-d model state
(ee_pos ++ ee_ori axis-angle ++ gripper qpos). Success: the block rests on the plate.
`expert_action()` is a scripted closed-loop solver reading the simulator state (move above the
block, descend, close, lift, carry above the plate, descend, open; it re-grasps after a miss).
"""

from __future__ import annotations

import numpy as np

from sim import demo_data as dd
from sim.env import EnvError, Observation, Step, checked_action, register

DEFAULT_MAX_STEPS = 100       # the suite's demos take 40-60 steps; the expert about 30
TOL = 1e-3                    # metres: "arrived" for the expert's targets
PLACE = dd.PLATE_TOP + dd.HALF + 0.005


class DemoEnv:
    """The demo task, stepped one 7-d action at a time."""

    action_dim = 7

    def __init__(self, tasks: int = 3, *, size: int = 128, data_seed: int = 0,
                 max_steps: int = DEFAULT_MAX_STEPS) -> None:
        most = len(dd.BLOCK_COLOURS) * len(dd.PLATE_COLOURS)
        if not 1 <= tasks <= most:
            raise EnvError(f"demo env: tasks must be 1..{most}, got {tasks}")
        if size < 32 or max_steps < 1:
            raise EnvError(f"demo env: size must be >= 32 and max_steps >= 1, got {size}, "
                           f"{max_steps}")
        self.name = "demo" if tasks == 3 else f"demo:{tasks}"
        self.tasks, self.size, self.data_seed = dd.task_list(tasks), size, data_seed
        self.max_steps = max_steps
        self.task: dd.Task | None = None
        self.number, self.steps = 0, 0
        self.layout: dict[str, np.ndarray] = {}
        self.body: dd.Body | None = None

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    # -- the Env interface

    def reset(self, seed: int) -> Observation:
        if seed < 0:
            raise EnvError(f"demo env: seed must be >= 0, got {seed}")
        self.task = self.tasks[seed % len(self.tasks)]
        self.number = seed // len(self.tasks)
        self.layout, _ = dd.scene(self.task, self.number, self.data_seed)
        self.body, self.steps = dd.Body.at_start(self.layout), 0
        return self._observe()

    def step(self, action: np.ndarray) -> Step:
        body = self._running()
        action = checked_action("demo env", self.steps, self.max_steps, action, self.action_dim)
        dd.physics_step(body, np.clip(action, -1.0, 1.0), self.layout)
        self.steps += 1
        success = dd.block_on_plate(body.block, self.layout)
        return Step(obs=self._observe(), success=success,
                    done=success or self.steps >= self.max_steps)

    def expert_action(self) -> np.ndarray:
        return expert(self._running(), self.layout)

    def close(self) -> None:
        self.body = None

    # -- extras

    def recorded_actions(self) -> np.ndarray:
        """The actions (T, 7) of the demo this episode's layout comes from (raw flavour, as
        `rynn-pipe demo-data` writes it with its defaults): the `replay` baseline."""
        self._running()
        _, actions, _ = dd.demo_episode(self.task, self.number, seed=self.data_seed)
        return actions

    def _running(self) -> dd.Body:
        if self.body is None:
            raise EnvError("demo env: call reset(seed) first")
        return self.body

    def _observe(self) -> Observation:
        view = {k: np.asarray(v)[None] for k, v in self.body.snapshot().items()}
        front, wrist = dd.render(view, self.task, self.layout, self.size)
        ee = dd.ee_observation(view)
        state = np.concatenate([ee["ee_pos"][0], ee["ee_ori"][0], ee["gripper_states"][0]])
        return Observation(front=dd.to_stored(front[0]), wrist=dd.to_stored(wrist[0]),
                           state=state, instruction=self.task.instruction)


def expert(body: dd.Body, layout: dict[str, np.ndarray]) -> np.ndarray:
    """The scripted solver's next action, a function of the simulator state alone."""
    if body.held:
        return _carry(body, layout["plate"])
    block = body.block
    if np.linalg.norm(body.pos - block) < dd.GRASP_TOL / 2:
        return _move(body.pos, body.pos, grip=1.0)        # close on the block
    if body.finger < dd.FINGER_OPEN / 2 and body.pos[2] < dd.HOVER - TOL:
        return _move(body.pos, body.pos + [0.0, 0.0, dd.MAX_STEP], grip=-1.0)  # missed: open, rise
    if np.linalg.norm(body.pos[:2] - block[:2]) > TOL:
        return _move(body.pos, np.array([block[0], block[1], max(dd.HOVER, block[2])]), grip=-1.0)
    return _move(body.pos, block, grip=-1.0)


def _carry(body: dd.Body, plate: np.ndarray) -> np.ndarray:
    above = np.array([plate[0], plate[1], dd.HOVER])
    if np.linalg.norm(body.pos[:2] - plate[:2]) > TOL:
        lift = body.pos[2] < dd.HOVER - TOL
        return _move(body.pos, [*body.pos[:2], dd.HOVER] if lift else above, grip=1.0)
    place = np.array([plate[0], plate[1], PLACE])
    if abs(body.pos[2] - PLACE) > TOL:
        return _move(body.pos, place, grip=1.0)
    return _move(body.pos, body.pos, grip=-1.0)           # release onto the plate


def _move(pos: np.ndarray, target, grip: float) -> np.ndarray:
    """Full speed towards `target` (arriving exactly when within one step), no rotation."""
    xyz = np.clip((np.asarray(target, dtype=np.float64) - pos) / dd.MAX_STEP, -1.0, 1.0)
    return np.concatenate([xyz, np.zeros(3), [grip]])


def _factory(arg: str | None, **kwargs) -> DemoEnv:
    if arg is not None and not arg.isdigit():
        raise EnvError(f"demo env: the spec is 'demo' or 'demo:<tasks>', got 'demo:{arg}'")
    return DemoEnv(int(arg) if arg else kwargs.pop("tasks", 3), **kwargs)


register("demo", _factory)
