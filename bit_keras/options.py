"""The options of the training verbs, each declared once: its name, type, default, check and help line.

`RUN` holds what every run shares (`bit_keras.training.engine.RunOptions` is made from it), `CLASSIFICATION_DATA`
what classification reads beyond it, and each recipe's table (`FINETUNE`, `PRETRAIN`, `DETECTION`, `DISTILL`) what
only that recipe takes. From these tables come the dataclasses' fields (`dataclass`), each verb's typed signature
(`verb`), the `bit-keras` flags and their help (`add_flags`) and the one-line checks (`check_fields`). A None
default means "the recipe's default": the recipe decides it, logs it and records it in run.json, so nothing is
inferred by comparing a value with a literal. This module imports nothing heavy: the command line builds its parser
from it without TensorFlow."""

import argparse
import dataclasses
import functools
import inspect
from collections.abc import Callable

from bit_keras import defaults
from bit_keras.checks import check_finite, check_int


@dataclasses.dataclass(frozen=True)
class Option:
    """One option: a keyword argument of the verbs that take it and (unless `flag` is None) their flag.

    `check`: "positive" (an integer >= 1), "count" (an integer >= 0), "rate" (a finite number > 0), "finite" (a
    finite number >= 0) or None. `choices` are the flag's (the recipe checks a Python value against them with its
    own message). `help` may hold `{default}`, which each verb fills with what its recipe does when the option is
    not given (`VERB_DEFAULTS`)."""

    name: str
    type: object  # the annotation of the keyword argument
    default: object = None
    help: str = ""
    check: str | None = None
    choices: tuple | None = None
    flag: str | None = ""  # "" -> --NAME; None: Python only; else the flag's own spelling (--no_weight_standardization)
    nargs: str | None = None  # argparse's, for a list

    @property
    def flag_name(self) -> str | None:
        return f"--{self.name}" if self.flag == "" else self.flag

    def check_value(self, value) -> None:
        """A one-line error naming the argument (the flag on the command line) for a bad value; None passes."""
        if value is None:
            return
        for item in value if self.nargs else (value,):
            if self.check == "positive":
                check_int(self.name, item)
            elif self.check == "count":
                check_int(self.name, item, minimum=0)
            elif self.check in ("rate", "finite"):
                check_finite(self.name, item, positive=self.check == "rate")


DATA_SOURCE = "tensorflow-datasets name or a bundled one"
RUN = (
    Option("dataset", "str | None", help="{default}"),
    Option("data", "bit_keras.data.sources.Data | None", flag=None),  # a Data of the caller's: Python only
    Option("data_dir", "str | None", help="tensorflow-datasets data directory"),
    Option("train_split", "str | None", help="tfds training split ({default})"),
    Option("test_split", "str | None", help="tfds test (held-out) split ({default})"),
    Option(
        "max_pixels",
        int,
        defaults.MAX_PIXELS,
        f"refuse image files larger than this (default {defaults.MAX_PIXELS:,})",
        "positive",
    ),
    Option("batch", "int | None", help="global batch ({default})", check="positive"),
    Option("batch_split", int, 1, "micro-batches per replica batch (same update)", "positive"),
    Option("base_lr", "float | None", help="{default}", check="rate"),
    Option("eval_every", "int | None", help="evaluate and checkpoint every N steps ({default})", check="positive"),
    Option("resolution", "int | None", help="{default}", check="positive"),
    Option(
        "strategy",
        "str | tf.distribute.Strategy",
        "auto",
        "tf.distribute strategy (default: auto)",
        choices=defaults.STRATEGIES,
    ),
    Option("tpu", "str | None", help="TPU name or grpc:// address ('local' on a TPU VM)"),
    Option("mixed_precision", "str | None", help="compute dtype", choices=("none", "bfloat16", "float16")),
    Option("xla", bool, False, "compile the train step with XLA (not with Mirrored on CPU)"),
    Option("seed", int, 0, "seed of the initialization, data order, augmentation and MixUp", "count"),
    Option("logdir", str, "runs", "where run folders go (default: runs)"),
    Option("name", "str | None", help="run name: the run folder is LOGDIR/NAME (default: from data and model)"),
    Option("overwrite", bool, False, "start afresh, deleting the run folder's run files"),
    Option("verbose", int, 1, flag=None),  # the command line's --quiet sets 0
)
MODEL = (Option("model", "str | None", help="{default}"),)  # each recipe's own default and kinds of model
PRETRAINED = (  # where the pretrained weights of a checkpoint name come from
    Option("bit_pretrained_dir", "str | None", help="folder of official NAME.npz checkpoints (else download)"),
    Option("cache_dir", "str | None", help="download cache directory"),
)
CLASSIFICATION_DATA = (
    Option("image_folder", "str | None", help="folder with one subfolder of images per class"),
    Option(
        "test_fraction",
        "float | None",
        help=f"of an image folder without train/ and test/ subfolders: the share of each class held out for testing "
        f"(default {defaults.TEST_FRACTION})",
        check="rate",
    ),
    Option("manual_dir", "str | None", help="tensorflow-datasets manual download directory"),
)
FINETUNE = (  # the BiT-HyperRule (bit_keras.training.finetune)
    Option("examples_per_class", "int | None", help="few-shot: K training examples per class", check="positive"),
    Option("examples_per_class_seed", int, 0, "seed of the few-shot draw", "count"),
    Option("dataset_size", "int | None", help="training-set size for the HyperRule", check="positive"),
    Option("steps", "int | None", help="total steps (the schedule scaled to fit)", check="positive"),
    Option("mixup_alpha", "float | None", help="MixUp alpha, replacing the HyperRule's", check="finite"),
    Option("freeze_backbone", bool, False, "train only the head (a linear probe)"),
    Option("trainable_from", "str | None", help="freeze everything before this", choices=defaults.TRAINABLE_FROM),
)
PRETRAIN = (  # the paper's upstream recipe (bit_keras.training.pretrain)
    Option(
        "schedule",
        "str | None",
        help="the paper's epochs and decays ({default})",
        choices=tuple(sorted(defaults.UPSTREAM_PRESETS)),
    ),
    Option("epochs", "int | None", help="replace the schedule's epochs", check="positive"),
    Option(
        "decay_epochs",
        "list[int] | tuple[int, ...] | None",
        help="replace the schedule's decay epochs",
        check="positive",
        nargs="+",
    ),
    Option("warmup_steps", "int | None", help="default: 5000 steps of batch 4096, rescaled", check="count"),
    Option("weight_decay", float, defaults.UPSTREAM_WEIGHT_DECAY, "L2 on kernels (default 1e-4)", "finite"),
    Option("normalization", str, "group", "group (BiT) or batch", choices=defaults.NORMALIZATIONS),
    Option(
        "weight_standardization",
        bool,
        True,
        "plain convolutions (the paper's ablation)",
        flag="--no_weight_standardization",
    ),
)
PRETRAIN_ALIASES = (  # the verb's earlier names (not the recipe's fields)
    Option(
        "preset", "str | None", help="the earlier name of --schedule", choices=tuple(sorted(defaults.UPSTREAM_PRESETS))
    ),
)
DETECTION = (  # the paper's RetinaNet recipe (bit_keras.detection.finetune)
    Option("coco_folder", "str | None", help="a COCO-format folder: images and annotations/instances*.json"),
    Option("epochs", "float | None", help="epochs ({default})", check="rate"),
    Option("steps", "int | None", help="total steps, replacing what the epochs give", check="positive"),
    Option("fpn_channels", "int | None", help="pyramid width ({default})", check="positive"),
    Option("head_channels", "int | None", help="subnet width ({default})", check="positive"),
    Option("head_depth", "int | None", help="subnet convolutions ({default})", check="positive"),
    Option("head_norm", "bool | None", help="group normalization in the subnets, for small batches ({default})"),
    Option("freeze_backbone", bool, False, "train only the pyramid and the subnets"),
)
DISTILL = (  # function matching (bit_keras.training.distill)
    Option("teacher", "str | None", help="{default}"),
    Option("student", "str | None", help="{default}"),
    Option("steps", "int | None", help="total steps ({default})", check="positive"),
    Option("temperature", float, 1.0, "softmax temperature of the KL divergence (default 1)", "rate"),
    Option(
        "mixup_alpha",
        "float | None",
        help=f"MixUp alpha of the shared batch (default {defaults.DISTILL_MIXUP_ALPHA:g}, the paper's function "
        "matching; 0 with --teacher_input fixed)",
        check="finite",
    ),
    Option(
        "warmup_steps",
        "int | None",
        help="linear warmup before the cosine decay (default: a twentieth of the steps)",
        check="count",
    ),
    Option("weight_decay", float, 0.0, "L2 on the student's kernels (default 0)", "finite"),
    Option(
        "teacher_input",
        str,
        "same",
        "same: the teacher sees the student's augmented batch (function matching); fixed: the plain images, as "
        "precomputed teacher outputs would (the paper's fixed teacher, for comparison)",
        choices=defaults.TEACHER_INPUTS,
    ),
)

_paper = defaults.DETECTION_DEFAULTS
# What each verb does with an option it is not given: the `{default}` of the help lines.
VERB_DEFAULTS = {
    "finetune": {
        "dataset": f"{DATA_SOURCE} (e.g. cifar10; bundled: digits, mnist5k)",
        "model": "checkpoint name (default BiT-M-R50x1), official .npz path/URL, architecture (from scratch), "
        ".keras file or run folder",
        "train_split": "default: train",
        "test_split": "default: test",
        "batch": "HyperRule: 512",
        "base_lr": "learning rate at batch 512 (HyperRule: 0.003)",
        "eval_every": "default: a tenth of the run",
        "resolution": "crop size, replacing the HyperRule's",
    },
    "pretrain": {
        "dataset": f"{DATA_SOURCE} (e.g. imagenet2012; bundled: digits, mnist5k)",
        "model": f"architecture, e.g. R50x1 or R26x0.5 (default {defaults.PRETRAIN_DEFAULTS['model']})",
        "train_split": "default: train",
        "test_split": "default: test",
        "batch": f"default {defaults.PRETRAIN_DEFAULTS['batch']}",
        "base_lr": f"lr per 256 examples (default {defaults.PRETRAIN_DEFAULTS['base_lr']})",
        "eval_every": "default: an epoch",
        "resolution": f"training crop and evaluation size (default {defaults.PRETRAIN_DEFAULTS['resolution']})",
        "schedule": f"default {defaults.PRETRAIN_DEFAULTS['schedule']}",
    },
    "finetune_detector": {
        "dataset": "coco/2017, voc/2007 or voc/2012 (tensorflow-datasets) or digit-canvases",
        "model": f"the backbone: checkpoint name (default {_paper['model']}), official .npz path/URL, architecture "
        "(from scratch) or .keras BiT",
        "train_split": "default: train",
        "test_split": "default: validation, or test for VOC 2007",
        "batch": f"paper: {_paper['batch']}",
        "base_lr": f"learning rate at batch 256 (paper: {_paper['base_lr']})",
        "eval_every": "evaluate (test loss, COCO AP) and checkpoint every N steps (default: a tenth of the run)",
        "resolution": f"square input side, a multiple of 128 (paper: {_paper['resolution']})",
        "epochs": f"paper: {_paper['epochs']}",
        "fpn_channels": f"paper: {_paper['fpn_channels']}",
        "head_channels": f"paper: {_paper['head_channels']}",
        "head_depth": f"paper: {_paper['head_depth']}",
        "head_norm": "paper: no",
    },
    "distill": {
        "dataset": f"{DATA_SOURCE} (default: the embedded digits)",
        "teacher": "anything finetune's --model takes with a head for the data's classes (default with no data: "
        f"LOGDIR/{defaults.DISTILL_TEACHER_RUN}, fine-tuned first when missing)",
        "student": "architecture (from scratch) or checkpoint, with a new head (default "
        f"{defaults.DISTILL_DEFAULTS['student']}; {defaults.DISTILL_EMBEDDED['student']} with no data)",
        "train_split": "default: train",
        "test_split": "default: test",
        "batch": f"default {defaults.DISTILL_DEFAULTS['batch']}; {defaults.DISTILL_EMBEDDED['batch']} with no data",
        "base_lr": f"learning rate at batch 512 (default {defaults.DISTILL_DEFAULTS['base_lr']})",
        "eval_every": "default: a tenth of the run",
        "resolution": "the shared crop size (default: the teacher's input size, else the HyperRule's)",
        "steps": f"default {defaults.DISTILL_DEFAULTS['steps']:,}; {defaults.DISTILL_EMBEDDED['steps']} with no "
        "data; the paper's schedules are long",
    },
}
VERB_TABLES = {  # the tables of each verb's options (by name: a test replaces a table), in signature order
    "finetune": ("RUN", "CLASSIFICATION_DATA", "MODEL", "PRETRAINED", "FINETUNE"),
    "pretrain": ("RUN", "CLASSIFICATION_DATA", "MODEL", "PRETRAIN", "PRETRAIN_ALIASES"),
    "finetune_detector": ("RUN", "MODEL", "PRETRAINED", "DETECTION"),
    "distill": ("RUN", "CLASSIFICATION_DATA", "PRETRAINED", "DISTILL"),
}
POSITIONAL = "dataset"  # the one argument a verb also takes by position


def declared(verb: str) -> dict[str, Option]:
    """The options of `verb` (a key of `VERB_TABLES`) by name, from the tables as they are now."""
    return {option.name: option for table in VERB_TABLES[verb] for option in globals()[table]}


def dataclass(*tables: str) -> Callable:
    """A class decorator: the frozen dataclass whose fields are the options of `tables` (by name, as they are now),
    then the class's own annotated fields."""

    def wrap(cls):
        own = inspect.get_annotations(cls)
        declared_fields = {option.name: option for table in tables for option in globals()[table]}
        for name, option in declared_fields.items():
            setattr(cls, name, dataclasses.field(default=option.default, metadata={"option": option}))
        cls.__annotations__ = {name: option.type for name, option in declared_fields.items()} | own
        return dataclasses.dataclass(frozen=True)(cls)

    return wrap


def check_fields(instance) -> None:
    """One-line errors for bad values of the declared fields of the dataclass `instance` (see `dataclass`), before
    any folder, download or TensorFlow op."""
    for field in dataclasses.fields(instance):
        if "option" in field.metadata:
            field.metadata["option"].check_value(getattr(instance, field.name))


def verb(name: str) -> Callable:
    """Turn `body(arguments: dict)` into the verb `name`: a function with the typed signature of the verb's options
    (`dataset` also positional, the rest keyword-only), which calls `body` with every argument (a dict); the run
    engine checks them."""

    def wrap(body):
        options = declared(name)
        parameters = [
            inspect.Parameter(
                option.name,
                inspect.Parameter.POSITIONAL_OR_KEYWORD
                if option.name == POSITIONAL
                else inspect.Parameter.KEYWORD_ONLY,
                default=option.default,
                annotation=option.type,
            )
            for option in sorted(options.values(), key=lambda option: option.name != POSITIONAL)
        ]
        signature = inspect.Signature(parameters, return_annotation=inspect.signature(body).return_annotation)

        @functools.wraps(body)
        def call(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return body(dict(bound.arguments))

        call.__signature__ = signature
        call.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": signature.return_annotation}
        del call.__wrapped__  # the signature is the declared one, not the body's
        return call

    return wrap


def add_flags(parser, verb: str) -> None:
    """The flags of `verb`'s options (those that have one) on the argparse `parser`: every default None (the
    recipe's) or the declared one, every help line with the verb's `{default}`."""
    described = VERB_DEFAULTS[verb]
    for option in declared(verb).values():
        if option.flag_name is not None:
            add_flag(parser, option, option.help.format(default=described.get(option.name, "default: the recipe's")))


def add_flag(parser, option: Option, help: str | None = None) -> None:
    """The flag of `option` on the argparse `parser`, with `help` (default: the option's)."""
    kwargs = {"dest": option.name, "help": option.help if help is None else help}
    if option.type is bool and option.default is True:
        parser.add_argument(option.flag_name, action="store_false", **kwargs)
    elif option.type is bool:
        parser.add_argument(option.flag_name, action="store_true", **kwargs)
    elif option.type == "bool | None":
        parser.add_argument(option.flag_name, action=argparse.BooleanOptionalAction, default=None, **kwargs)
    else:
        parser.add_argument(
            option.flag_name,
            type=_scalar(option.type),
            default=option.default,
            choices=option.choices,
            nargs=option.nargs,
            **kwargs,
        )


def _scalar(annotation) -> type | None:
    """The argparse type of an annotation: int or float for numbers (lists of them too), else None (a string)."""
    text = annotation if isinstance(annotation, str) else annotation.__name__
    for kind in (int, float):
        if text.startswith((kind.__name__, f"list[{kind.__name__}]")):
            return kind
    return None
