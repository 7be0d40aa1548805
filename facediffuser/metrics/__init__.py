"""Evaluation metrics, no Ray: identity, prompt consistency, the protocol, the subjects and the report.

Identity: FaceNet as in FastComposer, and dlib; CLIP prompt consistency; the protocol (prompts, seeds, methods).
Models are injected: weights come from local paths."""
