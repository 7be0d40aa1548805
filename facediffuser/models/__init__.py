"""The model classes: the subject encoder (PostFuseModule), SD 1.5 at its real sizes, the tiny test stack.

Imported on first use: `facediffuser.models.tiny`'s tokenizer (used by every training-data
actor) must not pull diffusers in through this package."""

import importlib

__all__ = ["PostFuseModule", "SubjectEncoder"]


def __getattr__(name):
    if name in __all__:
        return getattr(importlib.import_module("facediffuser.models.subject_encoder"), name)
    raise AttributeError(f"module 'facediffuser.models' has no attribute {name!r}")
