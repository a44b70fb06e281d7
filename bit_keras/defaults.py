"""The defaults and choices of the training recipes, in a module that imports nothing: the command line builds its
parser from them, so that `bit-keras --help` and argument errors never wait for TensorFlow. The recipes' own
modules re-export them under their old names (`bit_keras.training.finetune.EMBEDDED`, ...)."""

MAX_PIXELS = 100_000_000  # the default limit on an image's pixels: a 1 MB PNG can decode to gigabytes
STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "tpu")  # bit_keras.training.strategy.make_strategy
NORMALIZATIONS = ("group", "batch")  # BiT's GroupNorm, or the paper's BatchNorm ablation
TEST_FRACTION = 0.2  # of an image folder without train/ and test/ subfolders: held out per class for testing
SPLITS = ("train", "test")  # the tfds splits a classification run trains and tests on, unless named

# Fine-tuning (bit_keras.training.finetune). With no data given, `finetune` runs offline on scikit-learn's bundled
# digits with these settings: the small BiT shipped in the package (pretrained on MNIST by `bit-keras pretrain`) at
# 10x the HyperRule's base lr, which is tuned for the paper's large models (measured on the digits: 0.003 -> 89.1%,
# 0.03 -> 96.0%, 0.1 -> 96.7%).
FINETUNE_EMBEDDED = {"model": "BiT-R14x0.5-mnist5k", "batch": 64, "resolution": 32, "steps": 500, "base_lr": 0.03}
TRAINABLE_FROM = ("block1", "block2", "block3", "block4", "head")

# Upstream pretraining (bit_keras.training.upstream): the paper's recipe.
UPSTREAM_BASE_LR = 0.03  # per 256 examples of batch
UPSTREAM_BATCH = 4096
UPSTREAM_WEIGHT_DECAY = 1e-4
# (epochs, decay epochs): BiT-S (ILSVRC-2012) and BiT-M (ImageNet-21k) train 90 epochs, BiT-L (JFT-300M) 40.
UPSTREAM_PRESETS = {
    "bit-s": (90, (30, 60, 80)),
    "bit-m": (90, (30, 60, 80)),
    "bit-l": (40, (10, 23, 30, 37)),
}
PRETRAIN_DEFAULTS = {
    "model": "R50x1",
    "batch": UPSTREAM_BATCH,
    "base_lr": UPSTREAM_BASE_LR,
    "resolution": 224,
    "schedule": "bit-m",
}

# Detection (bit_keras.detection.finetune): the paper's COCO recipe (the standard RetinaNet one), 30 epochs of
# batch 256 at 1024px, lr 0.08, and its pyramid and subnets.
DETECTION_DEFAULTS = {"model": "BiT-M-R50x1", "batch": 256, "base_lr": 0.08, "resolution": 1024, "epochs": 30}
DETECTION_DEFAULTS |= {"fpn_channels": 256, "head_channels": 256, "head_depth": 4, "head_norm": False}
# With no data given: the digit canvases, the small BiT shipped in the package, a small pyramid and heads (64
# channels, 2 convolutions) so that the run takes minutes on 2 CPU cores, group norm in the heads and 4x the
# paper's lr (the README's detection section has the tuning runs).
DETECTION_EMBEDDED = {"model": "BiT-R14x0.5-mnist5k", "batch": 16, "base_lr": 0.32, "resolution": 128, "epochs": 24}
DETECTION_EMBEDDED |= {"fpn_channels": 64, "head_channels": 64, "head_depth": 2, "head_norm": True}

# Distillation (bit_keras.training.distill): function matching (Beyer et al., arXiv:2106.05237). MixUp at alpha 1
# (Beta(1, 1)) is the paper's function-matching setting: big_vision's configs/proj/distill/bigsweep_flowers_pet.py
# ("the recommended settings from Fig3/Tab4 of the paper"), `mixup = dict(p=1.0, n=2)`; KL at temperature 1 as its
# ImageNet config (bit_i1k.py). With no data given: the README's main job (the fine-tuned shipped model, fine-tuned
# first when missing) teaches an R14x0.5 from random initialization on the digits, with fine-tuning's embedded
# batch and steps, so that the labels-only run of the same student is the same budget. The base lr (at batch 512)
# was tuned there (500 steps, seed 0: 0.1 -> 89.3%, 0.3 -> 93.3%, 1.0 -> 53.8%).
DISTILL_TEACHER_RUN = "digits-BiT-R14x0.5-mnist5k"  # the main job's run folder, in --logdir
DISTILL_EMBEDDED = {"student": "R14x0.5", "batch": 64, "base_lr": 0.3, "resolution": 32, "steps": 500}
DISTILL_DEFAULTS = {"student": "R50x1", "batch": 512, "base_lr": 0.3, "steps": 10_000}  # on the user's data
DISTILL_MIXUP_ALPHA = 1.0
TEACHER_INPUTS = ("same", "fixed")  # the student's augmented batch (function matching), or the plain images

# Few-shot linear evaluation (bit_keras.training.fewshot): big_vision's configs/common_fewshot.py (shots, num_seeds,
# l2_reg = 2.0 ** 10); features computed 64 images at a time.
FEWSHOT = {"shots": (1, 5, 10, 25), "seeds": 3, "l2": 2.0**10, "batch": 64}

EXPORT_FORMATS = ("saved_model", "onnx", "tflite")  # bit_keras.serving.export.FORMATS
