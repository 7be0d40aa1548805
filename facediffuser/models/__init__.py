from facediffuser.models.subject_encoder import PostFuseModule, SubjectEncoder

__all__ = ["PostFuseModule", "SubjectEncoder"]
