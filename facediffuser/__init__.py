"""Face-diffuser: subject-to-image synthesis with a text-driven and a subject-augmented diffusion model."""

from facediffuser.models.subject_encoder import PostFuseModule, SubjectEncoder
from facediffuser.pipeline import FaceDiffuserOutput, FaceDiffuserPipeline
from facediffuser.sampling import FusionOptions, SNFOutput, snf_denoise

__version__ = "0.1.0"
__all__ = [
    "FaceDiffuserOutput", "FaceDiffuserPipeline", "FusionOptions", "PostFuseModule", "SNFOutput", "SubjectEncoder",
    "snf_denoise",
]
