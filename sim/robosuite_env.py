"""`robosuite:<Task>`: Lift, Stack and PickPlaceCan on MuJoCo, in LIBERO's robot and action space.

A Panda arm under robosuite's OSC_POSE controller in delta mode (LIBERO's 7-d actions: 6
end-effector deltas in [-1, 1], 0.05 m / 0.5 rad per step at 1.0, then the gripper at -1 open / +1
close), 20 Hz, both cameras (`agentview`, `robot0_eye_in_hand`) at `size` pixels, returned as
robosuite renders them: OpenGL convention, bottom row first, exactly what LIBERO's HDF5 files store.
The model state is LIBERO's 8-d vector: eef position ++ axis-angle of the eef quaternion ++ the two
gripper finger positions. Rendering is made cheap (anti-aliasing, reflections and shadows off:
3-4x faster per step at 128 px than robosuite's defaults, measured on 2 loaded cores). Resets are soft (the MuJoCo model
is built once, at construction, from a fixed seed, so Lift's cube size is the same in every
episode); each episode's object placement and arm noise come from `reset(seed)` only.

Needs the optional extra: `pip install -e '.[sim]'` (robosuite 1.4.1, mujoco<4) and, headless, Mesa
EGL (`apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri`). `MUJOCO_GL` defaults to `egl`.

    from sim.env import make_env
    env = make_env("robosuite:Lift", size=128)
    obs = env.reset(seed=0)
    while not (step := env.step(env.expert_action())).done:
        pass
    print(step.success)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from sim.demo_data import quat_to_rotvec
from sim.env import EnvError, Observation, Step, checked_action, register

os.environ.setdefault("MUJOCO_GL", "egl")

INSTALL_HINT = ("pip install -e '.[sim]' (robosuite 1.4.1 with mujoco<4) and, without a display, "
                "Mesa EGL: apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri")
CAMERAS = ("agentview", "robot0_eye_in_hand")
CONTROL_FREQ = 20
MAX_STEP = 0.05            # metres per step at |action| = 1 (OSC_POSE output_max)
MAX_ROT = 0.5              # radians per step at |action| = 1
MODEL_SEED = 0             # seeds what robosuite draws when it builds the model (cube sizes)


# Step limits: about 2.5x what the expert needs (median Lift 37, Stack 70, PickPlaceCan 145 steps).
@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """One robosuite task: its instruction, step limit and where the expert grasps and places."""

    name: str
    instruction: str
    max_steps: int
    grasp_body: Callable[[object], int]  # (robosuite env) -> body id of the object to grasp
    grasp_dz: float = 0.0               # grasp height above the object's body origin (m)
    align_yaw: bool = True              # turn the gripper to the object's faces (boxes)
    # (robosuite env) -> xyz where the grasped object's origin goes, or None to lift in place.
    place: Callable[[object], np.ndarray] | None = None


def _stack_target(env) -> np.ndarray:
    top = env.sim.data.body_xpos[env.cubeB_body_id].copy()
    top[2] += env.cubeB.size[2] + env.cubeA.size[2] + 0.01
    return top


def _can_body(env) -> int:
    return env.obj_body_id[env.objects[env.object_id].name]


def _bin_target(env) -> np.ndarray:
    target = env.target_bin_placements[env.object_id].copy()
    target[2] = env.bin2_pos[2] + 0.06
    return target


TASKS = {
    "Lift": TaskSpec(name="Lift", instruction="lift the red cube", max_steps=100,
                     grasp_body=lambda env: env.cube_body_id),
    "Stack": TaskSpec(name="Stack", instruction="stack the red cube on the green cube",
                      max_steps=200, grasp_body=lambda env: env.cubeA_body_id,
                      place=_stack_target),
    "PickPlaceCan": TaskSpec(name="PickPlaceCan", instruction="put the can in its bin",
                             max_steps=400, grasp_body=_can_body, align_yaw=False,
                             place=_bin_target),
}


def _import_robosuite():
    # robosuite warns on every import that it has no private macro file (we need none).
    logging.getLogger("robosuite_logs").setLevel(logging.ERROR)
    try:
        import robosuite  # the optional [sim] extra
        from robosuite import load_controller_config  # the optional [sim] extra
        from robosuite.utils import transform_utils  # the optional [sim] extra
    except ImportError as exc:
        raise EnvError(f"robosuite environments need robosuite ({exc}): {INSTALL_HINT}") from None
    return robosuite, load_controller_config, transform_utils


def _cheap_rendering(sim) -> None:
    """Anti-aliasing (offscreen multisampling), reflections and shadows off."""
    import mujoco  # the optional [sim] extra
    ctx = sim._render_context_offscreen
    sim.model.vis.quality.offsamples = 0
    ctx.gl_ctx.make_current()
    ctx.con.free()
    ctx._set_mujoco_context_and_buffers()
    for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION):
        ctx.scn.flags[flag] = 0


class RobosuiteEnv:
    """One robosuite task behind the `sim.env.Env` interface (see the module docstring)."""

    action_dim = 7

    def __init__(self, task: str | None, *, size: int = 128, max_steps: int | None = None,
                 cheap_render: bool = True) -> None:
        if task not in TASKS:
            raise EnvError(f"unknown robosuite task {task!r}; choose one of "
                           f"{', '.join(f'robosuite:{t}' for t in TASKS)}")
        if size < 32:
            raise EnvError(f"robosuite:{task}: size {size} is too small; use 128 or 256")
        self.spec = TASKS[task]
        self.name = f"robosuite:{task}"
        self.size = size
        self.max_steps = max_steps or self.spec.max_steps
        self._env = self._make(task, size)
        if cheap_render:
            _cheap_rendering(self._env.sim)
        self._expert = _Expert(self)
        self._obs: dict | None = None
        self._t = 0

    def _make(self, task: str, size: int):
        suite, load_controller_config, self._tf = _import_robosuite()
        config = load_controller_config(default_controller="OSC_POSE")
        saved = np.random.get_state()
        np.random.seed(MODEL_SEED)
        try:
            return suite.make(task, robots="Panda", controller_configs=config,
                              has_renderer=False, has_offscreen_renderer=True,
                              use_camera_obs=True, camera_names=list(CAMERAS),
                              camera_heights=size, camera_widths=size,
                              control_freq=CONTROL_FREQ, hard_reset=False, ignore_done=True,
                              horizon=10**6, reward_shaping=False)
        except (ImportError, OSError, RuntimeError, AttributeError) as exc:
            raise EnvError(f"robosuite:{task}: cannot create the simulator or its offscreen "
                           f"renderer (MUJOCO_GL={os.environ.get('MUJOCO_GL')}): "
                           f"{type(exc).__name__}: {exc}; {INSTALL_HINT}") from None
        finally:
            np.random.set_state(saved)

    # -- the Env interface -------------------------------------------------------------------

    def reset(self, seed: int) -> Observation:
        self._make_current()
        saved = np.random.get_state()
        np.random.seed(seed)          # robosuite 1.4 draws placements and arm noise from np.random
        try:
            self._obs = self._env.reset()
        finally:
            np.random.set_state(saved)
        self._t = 0
        self._expert.reset()
        return self._observation()

    def step(self, action: np.ndarray) -> Step:
        if self._obs is None:
            raise EnvError(f"{self.name}: call reset(seed) before step()")
        action = checked_action(self.name, self._t, self.max_steps, action, self.action_dim)
        self._make_current()
        self._obs, _, _, _ = self._env.step(np.clip(action, -1.0, 1.0))
        self._t += 1
        success = bool(self._env._check_success())
        return Step(obs=self._observation(), success=success,
                    done=success or self._t >= self.max_steps)

    def _make_current(self) -> None:
        """Render into this env's GL context (several envs may live in one process)."""
        self._env.sim._render_context_offscreen.gl_ctx.make_current()

    def expert_action(self) -> np.ndarray:
        if self._obs is None:
            raise EnvError(f"{self.name}: call reset(seed) before expert_action()")
        return self._expert.action()

    def close(self) -> None:
        self._env.close()

    # -- what the recorder needs ---------------------------------------------------------------

    def sim_state(self) -> np.ndarray:
        """The flattened MuJoCo state [time, qpos, qvel], as LIBERO's `states` stores it."""
        return np.asarray(self._env.sim.get_state().flatten(), dtype=np.float64)

    def model_xml(self) -> str:
        """The MJCF of the loaded scene (LIBERO's per-demo `model_file` attribute)."""
        return self._env.sim.model.get_xml()

    def proprio(self) -> dict[str, np.ndarray]:
        """The arm's joint positions (7) and the eef quaternion (x, y, z, w) now."""
        robot = self._env.robots[0]
        return {"joint_states": np.asarray(self._env.sim.data.qpos[robot._ref_joint_pos_indexes],
                                           dtype=np.float64),
                "ee_quat": np.asarray(self._obs["robot0_eef_quat"], dtype=np.float64)}

    def _observation(self) -> Observation:
        o = self._obs
        state = np.concatenate([o["robot0_eef_pos"], quat_to_rotvec(o["robot0_eef_quat"][None])[0],
                                o["robot0_gripper_qpos"]]).astype(np.float64)
        return Observation(front=np.ascontiguousarray(o["agentview_image"], dtype=np.uint8),
                           wrist=np.ascontiguousarray(o["robot0_eye_in_hand_image"],
                                                      dtype=np.uint8),
                           state=state, instruction=self.spec.instruction)


# ---------------------------------------------------------------------------------------------
# The scripted expert: a state machine on privileged simulator state
# ---------------------------------------------------------------------------------------------

HOVER = 0.10               # approach height above the grasp point (m)
CARRY = 0.12               # lift height above the grasp point, and carry height over the place
# The closing gripper lifts as soon as its fingers stop moving (width change under SETTLED), at
# most after CLOSE_STEPS. A fixed wait after the fingers settle would be a run of identical
# observations labelled first "hold" and then "lift": a policy that sees the state cannot tell
# them apart and learns to hold forever (measured: a trained policy closed on the cube and then
# hovered for the rest of every episode, with the expert's old 8-step wait).
CLOSE_STEPS = 8
SETTLED = 5e-4             # metres of finger-width change per step
OPEN_STEPS = 6
NEAR = 0.012               # position tolerance for a waypoint (m)
LOST = 0.05                # object this far from the fingers while carrying: grasp failed
# Steps after which a move that cannot get closer (a joint limit, the object in the way) ends
# anyway; carrying goes ~1.3 cm a step at full speed.
STALL = {"above": 60, "descend": 15, "carry": 90, "lower": 30}


def _wrap_quarter(angle: float) -> float:
    """angle modulo 90 degrees, into [-45, 45) degrees (a box looks the same every quarter turn)."""
    return (angle + np.pi / 4) % (np.pi / 2) - np.pi / 4


def _yaw(mat: np.ndarray) -> float:
    return float(np.arctan2(mat[1, 0], mat[0, 0]))


def _rot_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


class _Expert:
    """above -> descend -> close -> lift (-> carry -> lower -> open -> retreat); regrasp when the
    object slips out while lifting or carrying."""

    def __init__(self, env: RobosuiteEnv) -> None:
        self._env = env
        self.reset()

    def reset(self) -> None:
        self.phase, self.count = "above", 0
        self._width: float | None = None          # finger width at the previous close step
        self._home: np.ndarray | None = None
        self._lift_to: np.ndarray | None = None

    # privileged state
    def _rs(self):
        return self._env._env

    def _eef(self) -> tuple[np.ndarray, np.ndarray]:
        rs = self._rs()
        site = rs.robots[0].eef_site_id
        return rs.sim.data.site_xpos[site].copy(), rs.sim.data.site_xmat[site].reshape(3, 3).copy()

    def _object(self) -> tuple[np.ndarray, np.ndarray]:
        rs = self._rs()
        body = self._env.spec.grasp_body(rs)
        return rs.sim.data.body_xpos[body].copy(), rs.sim.data.body_xmat[body].reshape(3, 3).copy()

    def _finger_width(self) -> float:
        qpos = self._env._obs["robot0_gripper_qpos"]
        return float(qpos[0] - qpos[1])

    def _goal_orientation(self, rot: np.ndarray, obj_rot: np.ndarray) -> np.ndarray:
        if self._home is None:
            self._home = rot
        if not self._env.spec.align_yaw:
            return self._home
        return _rot_z(_wrap_quarter(_yaw(obj_rot) - _yaw(self._home))) @ self._home

    def _move(self, pos: np.ndarray, rot: np.ndarray, target: np.ndarray, goal_rot: np.ndarray,
              grip: float) -> np.ndarray:
        tf = self._env._tf
        xyz = np.clip((target - pos) / MAX_STEP, -1.0, 1.0)
        rotvec = tf.quat2axisangle(tf.mat2quat(goal_rot @ rot.T))
        return np.concatenate([xyz, np.clip(rotvec / MAX_ROT, -1.0, 1.0), [grip]])

    def action(self) -> np.ndarray:
        pos, rot = self._eef()
        obj, obj_rot = self._object()
        goal_rot = self._goal_orientation(rot, obj_rot)
        grasp = obj + np.array([0.0, 0.0, self._env.spec.grasp_dz])
        held = np.linalg.norm(obj - pos) < LOST
        place = self._env.spec.place
        self.count += 1
        phase = self.phase
        if phase in ("lift", "carry", "lower") and not held:
            self._enter("regrasp")
        elif phase == "above":
            target = grasp + [0.0, 0.0, HOVER]
            if (np.linalg.norm((target - pos)[:2]) < NEAR and abs(target[2] - pos[2]) < 2 * NEAR
                    or self.count > STALL["above"]):
                self._enter("descend")
            return self._move(pos, rot, target, goal_rot, -1.0)
        elif phase == "descend":
            if np.linalg.norm(grasp - pos) < NEAR / 2 or self.count > STALL["descend"]:
                self._enter("close")
            return self._move(pos, rot, grasp, goal_rot, -1.0)
        elif phase == "close":
            width = self._finger_width()
            settled = self._width is not None and abs(width - self._width) < SETTLED
            self._width = width
            if self.count >= CLOSE_STEPS or (self.count >= 3 and settled):
                self._lift_to = pos + [0.0, 0.0, CARRY]
                self._enter("lift")
                return self._move(pos, rot, self._lift_to, rot, 1.0)
            return self._move(pos, rot, pos, rot, 1.0)
        elif phase == "lift":
            if place is not None and pos[2] > self._lift_to[2] - 2 * NEAR:
                self._enter("carry")
            return self._move(pos, rot, self._lift_to, rot, 1.0)
        elif phase == "carry":
            target = place(self._rs()) + (pos - obj) + [0.0, 0.0, CARRY]
            if np.linalg.norm((target - pos)[:2]) < 2 * NEAR or self.count > STALL["carry"]:
                self._enter("lower")
            return self._move(pos, rot, target, rot, 1.0)
        elif phase == "lower":
            target = place(self._rs()) + (pos - obj)
            if np.linalg.norm(target - pos) < NEAR or self.count > STALL["lower"]:
                self._enter("open")
            return self._move(pos, rot, target, rot, 1.0)
        elif phase == "open":
            if self.count >= OPEN_STEPS:
                self._enter("retreat")
            return self._move(pos, rot, pos, rot, -1.0)
        if self.phase == "regrasp":   # open while rising, then approach again
            if self.count >= OPEN_STEPS:
                self._enter("above")
            return self._move(pos, rot, pos + [0.0, 0.0, MAX_STEP / 2], rot, -1.0)
        return self._move(pos, rot, pos + [0.0, 0.0, MAX_STEP], rot, -1.0)   # retreat

    def _enter(self, phase: str) -> None:
        self.phase, self.count, self._width = phase, 0, None


def _factory(task: str | None, **kwargs) -> RobosuiteEnv:
    return RobosuiteEnv(task, **kwargs)


register("robosuite", _factory)
