"""Shared test setup. Tests that need several (simulated) devices start a subprocess
with XLA_FLAGS=--xla_force_host_platform_device_count=8, since the flag must be set
before jax is imported."""
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
