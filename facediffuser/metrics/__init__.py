"""Evaluation metrics (no Ray): identity (FaceNet as in FastComposer, dlib), CLIP prompt consistency, the
protocol (subjects, prompts, methods) and the report. Models are injected: weights come from local paths."""
