import os

import torch
from hypothesis import HealthCheck, settings

# Two xdist workers share two cores: one intra-op thread each.
torch.set_num_threads(1)

# "default" (make test, CI) draws the same examples on every run, so a red CI is reproducible and
# never a roll of the dice; HYPOTHESIS_PROFILE=explore draws new ones each run to look for bugs.
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("default", deadline=None, suppress_health_check=_QUIET, derandomize=True)
settings.register_profile("explore", deadline=None, suppress_health_check=_QUIET, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_report_header() -> str:
    """Which CPU kernels this run uses (``make test-kernels`` reruns the numerics under others)."""
    asked = os.environ.get("ATEN_CPU_CAPABILITY", "unset")
    return f"CPU kernels: aten {torch.backends.cpu.get_cpu_capability()} (ATEN_CPU_CAPABILITY={asked})"
