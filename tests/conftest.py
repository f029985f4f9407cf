"""Shared test setup.

XLA:CPU spends most of a small test's time compiling. Tests check numbers, not speed,
so they compile with backend optimisations and fusion emitters off (about 2-3x less
compile time; measured side by side). This must be set before jax is imported.

Tests that need several (simulated) devices start a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8, since that flag too must be set
before jax is imported.
"""
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
FAST_COMPILE_FLAGS = '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'
os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()
