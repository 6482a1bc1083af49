"""Know before you rent: the peak accelerator memory and FLOPs of a real-size step,
computed on a CPU in seconds, without weights.

``ddspo_fast.plan(config_or_model, batch=..., ...)`` (this module is callable) returns an
``Estimate``; ``estimate_step(arch, options)`` does the same for an architecture (an
``Arch`` or a Spec of ``bench/archs.py``), ``estimate_inference`` for the pipeline runs of
``prepare`` and ``evaluate``. How: the denoiser is built on the meta device, its
parameters swapped for fake tensors, and one whole step traced op by op under CUDA's
autocast rules and the attention kernel a GPU would run (``step.py``, ``tracker.py``,
``gpu_rules.py``), in a subprocess; what cannot be traced is counted (``analytic.py``);
one margin per kind of figure (``margin.py``) is fitted on published measurements
(``published.py``).
"""
from __future__ import annotations

import sys
import types

from .api import options_from_train_config, plan
from .archs import Arch, by_name, from_folder, resolve
from .estimate import Estimate, PlanOptions, estimate_step

__all__ = ["plan", "estimate_step", "Estimate", "PlanOptions", "Arch", "by_name",
           "from_folder", "resolve", "options_from_train_config"]


class _CallableModule(types.ModuleType):
    # `ddspo_fast.plan` is this package (importing a submodule binds the name to it), so
    # the package itself answers `ddspo_fast.plan(...)`.
    def __call__(self, *args, **kwargs):
        return plan(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
