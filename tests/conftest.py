import os

import torch
from hypothesis import HealthCheck, settings

# Two xdist workers share two cores: one intra-op thread each.
torch.set_num_threads(1)

settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
