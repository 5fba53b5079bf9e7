"""Published min/max constants, kept loadable as named presets for parity checks (SPEC.md 3, 9.1).

The published RynnVLA-002 code pastes its LIBERO min/max into source, fitted over the no-op
filtered data of the four LIBERO suites (spatial, object, goal, 10). It uses TWO action tables:
one in its VLA (action + state) item processor and another in its world-model item processor, so
one action can map to two token ids. This project fits one stats artifact for both query types
(`bins.preset=None`); these presets reproduce the published numbers when parity matters:

- `libero_published`     : the VLA processor's action table and its state table.
- `libero_published_wm`  : the world-model processor's action table (no state table there; the
                           VLA state table is reused so the preset is complete).

Values: rynnvla-002/data/item_processor.py of the published repository (FlexARItemProcessor_Action_State
and FlexARItemProcessor_Action), state = ee_pos(3) ++ ee_ori axis-angle(3) ++ gripper_states(2).
"""

from __future__ import annotations

LIBERO_STATE_MIN = (-0.4827807, -0.3309336, 0.00812818, 1.00279467, -3.63125079, -1.84273835,
                    -0.00545302, -0.04201502)
LIBERO_STATE_MAX = (2.10313803e-01, 3.90426440e-01, 1.47277813e+00, 3.72486417e+00,
                    3.56188956e+00, 1.38632160e+00, 4.23214189e-02, 1.31260958e-03)

LIBERO_VLA_ACTION_MIN = (-0.9375, -0.9375, -0.9375, -0.24214286, -0.375, -0.36428571, -1.0)
LIBERO_VLA_ACTION_MAX = (0.9375, 0.9375, 0.9375, 0.34821429, 0.375, 0.375, 1.0)

LIBERO_WM_ACTION_MIN = (-0.9375, -0.9375, -0.9375, -0.32571429, -0.375, -0.375, -1.0)
LIBERO_WM_ACTION_MAX = (0.9375, 0.9375, 0.9375, 0.375, 0.375, 0.375, 1.0)

# name -> {"state": (min, max), "action": (min, max)}
PRESETS: dict[str, dict[str, tuple[tuple[float, ...], tuple[float, ...]]]] = {
    "libero_published": {"state": (LIBERO_STATE_MIN, LIBERO_STATE_MAX),
                         "action": (LIBERO_VLA_ACTION_MIN, LIBERO_VLA_ACTION_MAX)},
    "libero_published_wm": {"state": (LIBERO_STATE_MIN, LIBERO_STATE_MAX),
                            "action": (LIBERO_WM_ACTION_MIN, LIBERO_WM_ACTION_MAX)},
}
