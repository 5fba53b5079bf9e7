"""Closed-loop simulation: environments, scripted experts, rollouts and real-physics demo recording.

`sim.env` holds the interface every environment implements; implementations live beside it
(`sim.demo_env` for the built-in procedural task, `sim.robosuite_env`, `sim.libero_env`).
"""
