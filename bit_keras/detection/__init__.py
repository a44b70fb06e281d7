"""Object detection: a RetinaNet on a BiT backbone, trained on the run engine (see the README's detection section)."""
