import os

import torch
from hypothesis import HealthCheck, settings

# CI runs a fixed number of examples per property; INFLATE_HYPOTHESIS_PROFILE=thorough for more.
settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                          derandomize=True)
settings.register_profile("thorough", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("INFLATE_HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(1)



