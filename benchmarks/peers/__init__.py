"""The measured frameworks, one module each: a builder and a step per task (inference, training)."""
