"""The Face-diffuser library, no Ray: the models, the SNF sampler and pipeline, data, training and metrics.

Face-diffuser: subject-to-image synthesis with a text-driven and a subject-augmented diffusion model.
"""

import importlib

__version__ = "0.1.0"

# Imported on first use, so that light users of the package (e.g. the preprocessing stages in every Ray
# worker) do not pay for importing diffusers and transformers.
_EXPORTS = {
    "PostFuseModule": "facediffuser.models.subject_encoder",
    "SubjectEncoder": "facediffuser.models.subject_encoder",
    "FaceDiffuserOutput": "facediffuser.pipeline_output",
    "FaceDiffuserPipeline": "facediffuser.pipeline",
    "FusionOptions": "facediffuser.sampling",
    "SNFOutput": "facediffuser.sampling",
    "snf_denoise": "facediffuser.sampling",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'facediffuser' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS])
