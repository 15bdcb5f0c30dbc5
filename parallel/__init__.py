"""Meshes, sharding rules and context-parallel attention (installed as `longtrain.parallel`)."""
