"""Data: sources (`sources`: tfds, image folders, arrays, bundled), image files (`images`), the tf.data
pipeline (`pipeline`) and MixUp (`mixup`)."""
