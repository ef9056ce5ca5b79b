"""The job's configuration: typed dataclasses, TOML files in `job/configs/`, `--set a.b=c` overrides.

Every tunable number of the job lives here, with its default and a one-line meaning.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from job.errors import JobError
from models.mobilenet_layers import mobilenet_v2_layer_names, stage_of

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG = "demo"
# The demo recipe (32 px, a narrow network, a few epochs) is for `make demo`'s few hundred synthetic images: on
# more train images than this, the job warns and names the recipes for real data.
DEMO_MAX_TRAIN_IMAGES = 2000
REAL_DATA_CONFIGS = {"cpu-real": "the real subset on a CPU", "t4": "full Tiny ImageNet on a GPU"}
# model.weights files: Keras' weight files (HDF5) and saved models (zip archives), told by suffix and signature.
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
WEIGHTS_SIGNATURES = {".weights.h5": b"\x89HDF\r\n\x1a\n", ".h5": b"\x89HDF\r\n\x1a\n", ".keras": b"PK\x03\x04"}
MAX_PORT = 65535
# The evaluate stage's evaluations, by the names job/evaluations.py registers them under (evaluate.evaluations
# lists those to run; each boolean switch of [evaluate] still turns its own off).
EVALUATIONS = ("linear_probe", "knn", "linear_probe_200", "depth_probe", "depth_probe_200", "colour_baseline",
               "scratch_baseline", "label_efficiency", "s4l")


@dataclass
class DataConfig:
    """Where images come from and how they are shaped."""

    image_size: int = 64  # side in pixels every image is decoded/resized to
    downstream_wnids: list[str] = field(default_factory=lambda: ["n01443537", "n01855672"])
    downstream_names: list[str] = field(default_factory=lambda: ["fish", "duck"])
    cache_dir: str = "~/.cache/rotnet-job"  # downloads and decoded uint8 arrays, reused across runs
    decode_threads: int = 0  # 0 = one per CPU core
    crop_padding: int = 4  # random crop after padding this many pixels (reflect) on each side
    prefetch_batches: int = 4
    # How the pretext's train images are held in host memory: "decoded" (uint8 pixels, 3 bytes a pixel: the
    # fastest pipeline) or "encoded" (the JPEG bytes, ~1/5 of that at 64 px, decoded a batch at a time in-graph:
    # for a small host). The same pixels either way (docs/throughput.md).
    store: str = "decoded"
    # The expected sha256 (64 hex digits) of an https:// --data file: a download that differs is deleted and the
    # run fails (exit 3); a cached copy recorded with this sha256 is reused without a request. "" = not checked.
    sha256: str = ""


@dataclass
class ModelConfig:
    """The MobileNetV2 backbone and its heads."""

    alpha: float = 1.0  # MobileNetV2 width multiplier
    weights: str = "none"  # "none" (random init), "imagenet", or a path to a .weights.h5 / .keras file
    bn_momentum: float = 0.9  # Keras' 0.999 leaves moving statistics unusable after short runs
    stem_stride: int = 2  # 1 halves the total stride (32 → 16): a 4x4 final map at 64 px
    input_scale: int = 1  # upsample the input by this factor before the backbone (2: 128 px)
    head_hidden_units: int = 0  # rotation head: 0 = linear on pooled features, else one hidden layer
    classifier_dropout: float = 0.0


@dataclass
class PretextConfig:
    """Self-supervised rotation prediction (0/90/180/270 degrees)."""

    epochs: int = 30
    batch_images: int = 128  # images per global batch; each appears in all 4 rotations (4x samples)
    max_images: int = 0  # cap on train images used (0 = all)
    # 0 = one pass over the images. N = N batches an epoch, drawn from a fresh shuffle (wrapping around a smaller
    # set): the pretext's compute is then the same on any set (a set that one pass fills in N batches: one pass).
    steps_per_epoch: int = 0
    optimizer: str = "adamw"  # "adamw" or "sgd" (Nesterov momentum)
    learning_rate: float = 2e-3  # peak learning rate, reached after warmup
    # Decoupled: the weights shrink by learning rate x weight_decay a step, outside the momentum. PyTorch's SGD
    # decay d with momentum m is about d / (1 - m) here (RotNet's 5e-4 at momentum 0.9: 5e-3).
    weight_decay: float = 0.05
    # Trained variables the weight decay skips, by a substring of their path: "gamma" and "beta" are BatchNorm's
    # scales and offsets, "depthwise" the depthwise kernels (MobileNet, Howard et al. 2017, puts little or no
    # decay on their few parameters), "bias" the heads' biases; [] = decay every one.
    weight_decay_exempt: list[str] = field(default_factory=list)
    warmup_epochs: float = 1.0
    # Epochs without val improvement before stopping (0 = off), checked at each evaluation (eval_every_epochs).
    early_stopping_patience: int = 0
    # A MobileNetV2 layer (e.g. block_2_add): the backbone's layers up to and including it keep their initial
    # weights (model.weights) in the pretext, their BatchNorm statistics still following the data; "" = train
    # every layer. Rotation needs no colour, and on a short CPU pretext it trains the shallow layers away from
    # the colour a random network's keep; with the colour-order task (colour_order_weight) they learn it instead,
    # and cpu-real trains every layer (docs/results.md).
    frozen_through: str = ""
    # The MobileNetV2 layer whose pooled output the rotation head reads: "out_relu" is the whole backbone; an
    # earlier layer (e.g. block_12_add) trains only the layers up to it, and the later ones keep their initial
    # weights (the downstream transfer reads block_2_add to block_9_add on the mini set).
    head_layer: str = "out_relu"
    # Each pretext crop covers a uniform draw from [min_crop_area, 1] of the image's area (square, scaled back to
    # data.image_size by nearest neighbour) before the data.crop_padding shift; 1.0 = the shift alone.
    min_crop_area: float = 1.0
    online_probe: bool = True  # stop-gradient linear classifier on train labels, for monitoring only
    val_max_images: int = 0  # cap on val images for the per-epoch rotation eval (0 = all)
    # The val rotation accuracy (and early stopping, the best epoch's weights, TensorBoard's val curves) after
    # every so many epochs and after the last: 2,080 val images in four rotations cost ~6 s on 2 CPU cores, a
    # seventh of a cpu-real epoch.
    eval_every_epochs: int = 1
    # A second pretext task, trained with the first from the same features: which of the six orders of its R, G
    # and B channels a sample is shown in (the colour-order head's loss weighted by this; 0 = off). Rotation needs
    # no colour, so alone it trains the colour out of the features; telling a goldfish's orange from its
    # channel-swapped blue needs to know what colour things are (docs/results.md).
    colour_order_weight: float = 0.0
    # The share of the samples shown in another order (uniform over the five); the rest keep their own colours.
    shuffled_colour_fraction: float = 0.5


@dataclass
class FinetuneConfig:
    """Transfer to the binary downstream task."""

    epochs: int = 20
    min_steps: int = 100  # small label fractions still get this many steps (epochs then repeat their images)
    batch_size: int = 64
    # "finetune" (all layers), "linear" (frozen backbone) or "s4l": fine-tuning jointly with the rotation loss on
    # all downstream train images, labelled or not, through the backbone up to pretext.head_layer and a rotation
    # head (S4L, Zhai et al. 2019); from the pretrained backbone the rotation head starts as the pretext task's.
    mode: str = "finetune"
    # MobileNetV2 layers whose globally pooled outputs, concatenated, feed the classifier head (the backbone is
    # cut after the deepest): rotation features peak before the last block, and early blocks keep colour.
    # ["auto"]: of evaluate.depth_probe_layers, each alone or beside the shallowest, the one whose frozen
    # features classify best in 4-fold cross-validation on the downstream train labels (never val).
    transfer_layers: list[str] = field(default_factory=lambda: ["out_relu"])
    # ["auto"]: the deepest candidate within this many standard errors of the best cross-validated accuracy (a
    # frozen probe ties them; the deeper carries more pretrained layers into the fine-tune); 0 = the best.
    transfer_tolerance_se: float = 0.0
    # "probe": from the pretrained backbone, the head starts as a logistic regression fitted on the frozen
    # features of the run's labelled images (LP-FT), so fine-tuning starts from a classifier, not from noise.
    head_init: str = "random"
    freeze_batchnorm: bool = False  # pretrained backbone: keep its BatchNorm statistics while fine-tuning
    # Each labelled crop covers a uniform draw from [min_crop_area, 1] of the image's area (square, scaled back to
    # data.image_size), as pretext.min_crop_area does for the pretext; 1.0 = the data.crop_padding shift alone.
    # Both initialisations train on the same crops.
    min_crop_area: float = 1.0
    label_fraction: float = 1.0  # stratified, seeded share of labelled train images used
    optimizer: str = "adamw"
    learning_rate: float = 1e-3
    backbone_lr_scale: float = 0.1  # pretrained backbone's learning rate = learning_rate * this ("finetune" mode)
    weight_decay: float = 0.05
    weight_decay_exempt: list[str] = field(default_factory=list)  # as pretext.weight_decay_exempt
    warmup_epochs: float = 1.0
    early_stopping_patience: int = 0
    seeds: int = 1  # the downstream stage is repeated with this many seeds; mean and std reported
    s4l_images: int = 16  # "s4l": unlabelled images per step, each in four rotations
    s4l_rotation_weight: float = 1.0  # "s4l": weight of the rotation loss beside the supervised one


@dataclass
class EvaluateConfig:
    """Evaluations of the pretrained backbone."""

    # The evaluations to run, by name (job/evaluations.py); one left out is not run and its metrics.json keys
    # read null. Those with a boolean key below (scratch_baseline, colour_baseline, s4l, linear_probe_200,
    # depth_probe, depth_probe_200) run only when it is true too.
    evaluations: list[str] = field(default_factory=lambda: list(EVALUATIONS))
    knn_k: int = 20  # neighbours of the k-NN probe; capped below the number of downstream train images
    probe_steps: int = 300  # full-batch steps of the logistic-regression probes
    probe_learning_rate: float = 0.05
    probe_weight_decay: float = 1e-4
    scratch_baseline: bool = True  # the downstream recipe from random init, at every label fraction
    colour_baseline: bool = True  # logistic regression on RGB colour histograms, at every label fraction
    colour_bins: int = 4  # histogram cells per channel (bins**3 features)
    label_fractions: list[float] = field(default_factory=lambda: [1.0])
    # Seeds (each its own label subset) for each of label_fractions, in its order; [] = finetune.seeds for each.
    # A few labels train in seconds, and their accuracy moves most with the subset drawn.
    label_fraction_seeds: list[int] = field(default_factory=list)
    # Also train S4L (finetune.mode = "s4l") from the pretrained backbone at every label fraction, reported as a
    # row of its own beside the pure transfer numbers.
    s4l: bool = False
    linear_probe_200: bool = False  # 200-way linear probe on Tiny ImageNet val
    # Downstream linear probe on features pooled at several depths, pretrained vs random init: where the
    # transferable information sits (and whether pretraining added any over a random network); scored on val and,
    # cross-validated, on the downstream train labels alone (downstream.depth_probe_cv).
    depth_probe: bool = False
    # The 200-way linear probe at each of depth_probe_layers, pretrained vs random init: the same question on every
    # class and every val image.
    depth_probe_200: bool = False
    depth_probe_layers: list[str] = field(
        default_factory=lambda: ["block_2_add", "block_5_add", "block_9_add", "block_12_add", "block_15_add",
                                 "out_relu"]
    )
    report_examples: int = 16  # images shown in the report's example grids


@dataclass
class RuntimeConfig:
    """How the job runs: seeds, checkpoints, logging, precision."""

    seed: int = 0
    checkpoint_every_steps: int = 200
    keep_checkpoints: int = 2
    log_every_steps: int = 20
    # Train steps per traced call: the host reads the step and metrics, and checks for a stop, once per call
    # (and always at log and checkpoint steps and epoch ends). More amortises launch and sync overhead (GPU).
    steps_per_loop: int = 1
    mixed_precision: str = "auto"  # "auto" (on with a GPU), "on", "off"
    xla: str = "auto"  # "auto" (on with a GPU), "on", "off"
    # Bit-identical results for the same config and data, in one run or killed and resumed: op determinism and
    # one inter-op thread (concurrent backward ops changed CPU round-off between runs). Costs speed (README).
    deterministic: bool = False
    sync_interval_s: float = 60.0  # upload interval when --output is gs://
    # Multi-task Slurm jobs: each job's ports lie in [slurm_port_base, slurm_port_base + slurm_port_count),
    # below Linux's ephemeral ports (32768-60999); the job id picks the block (job/slurm.py).
    slurm_port_base: int = 20000
    slurm_port_count: int = 10000
    barrier_timeout_s: float = 3600.0  # how long a worker waits for the others (e.g. the chief's exports, pushes)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretext: PretextConfig = field(default_factory=PretextConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def dotted_settings(sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A config as `Config.to_dict()` (or a run's config.json) gives it, keyed `section.key`."""
    return {f"{section}.{key}": value for section, values in sections.items() for key, value in values.items()}


_CHOICES = {
    ("data", "store"): ("decoded", "encoded"),
    ("pretext", "optimizer"): ("adamw", "sgd"),
    ("finetune", "optimizer"): ("adamw", "sgd"),
    ("finetune", "mode"): ("finetune", "linear", "s4l"),
    ("finetune", "head_init"): ("random", "probe"),
    ("runtime", "mixed_precision"): ("auto", "on", "off"),
    ("runtime", "xla"): ("auto", "on", "off"),
    ("model", "stem_stride"): (1, 2),
}


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def load_config(source: str | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a named config (`demo`) or a TOML path, then apply `section.key=value` overrides."""
    path = _config_path(source or DEFAULT_CONFIG)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise JobError(f"{path} is not valid TOML ({err}): fix the file or pick another --config.") from err
    config = Config()
    for section, values in raw.items():
        if not isinstance(values, dict):
            raise JobError(f"{path}: top-level key '{section}' must be a [section]; see job/configs/demo.toml.")
        for key, value in values.items():
            _assign(config, section, key, value, where=str(path))
    for item in overrides:
        section, key, value = _parse_override(item)
        _assign(config, section, key, _parse_value(value), where=f"--set {item}")
    validate(config)
    return config


def _config_path(source: str) -> Path:
    path = Path(source)
    if path.suffix == ".toml":
        if not path.is_file():
            raise JobError(f"config file {path} does not exist: pass an existing TOML file or a name.")
        return path
    named = CONFIG_DIR / f"{source}.toml"
    if not named.is_file():
        raise JobError(
            f"unknown config '{source}': use one of {', '.join(available_configs())} or a path to a .toml file."
        )
    return named


def _parse_override(item: str) -> tuple[str, str, str]:
    name, sep, value = item.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not key:
        raise JobError(f"--set {item!r} is malformed: write it as section.key=value, e.g. pretext.epochs=5.")
    return section, key, value.strip()


def _parse_value(text: str) -> Any:
    """Read an override value as TOML (numbers, booleans, lists, quoted strings), else as a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _assign(config: Config, section: str, key: str, value: Any, where: str) -> None:
    sections = {f.name for f in dataclasses.fields(Config)}
    if section not in sections:
        raise JobError(f"{where}: unknown section '{section}': use one of {', '.join(sorted(sections))}.")
    target = getattr(config, section)
    hints = typing.get_type_hints(type(target))
    if key not in hints:
        raise JobError(f"{where}: unknown key '{section}.{key}': valid keys are {', '.join(sorted(hints))}.")
    setattr(target, key, _coerce(value, hints[key], f"{where}: {section}.{key}"))


def _coerce(value: Any, hint: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise JobError(f"{name} must be a list like [1, 2], got {value!r}.")
        return [_coerce(v, item_type, name) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    raise JobError(f"{name} must be of type {hint.__name__}, got {value!r}.")


def validate(config: Config) -> None:
    """Check ranges and choices; raise one JobError naming the key and the allowed values."""
    for (section, key), choices in _CHOICES.items():
        value = getattr(getattr(config, section), key)
        if value not in choices:
            raise JobError(f"{section}.{key} = {value!r} is not allowed: use one of {list(choices)}.")
    positive = {
        "data.image_size": config.data.image_size,
        "model.alpha": config.model.alpha,
        "model.input_scale": config.model.input_scale,
        "pretext.epochs": config.pretext.epochs,  # 0 would export an untrained backbone as pretrained
        "finetune.epochs": config.finetune.epochs,
        "pretext.batch_images": config.pretext.batch_images,
        "pretext.learning_rate": config.pretext.learning_rate,
        "pretext.eval_every_epochs": config.pretext.eval_every_epochs,
        "finetune.batch_size": config.finetune.batch_size,
        "finetune.learning_rate": config.finetune.learning_rate,
        "finetune.seeds": config.finetune.seeds,
        "finetune.s4l_images": config.finetune.s4l_images,
        "evaluate.knn_k": config.evaluate.knn_k,
        "evaluate.colour_bins": config.evaluate.colour_bins,
        "runtime.checkpoint_every_steps": config.runtime.checkpoint_every_steps,
        "runtime.log_every_steps": config.runtime.log_every_steps,
        "runtime.steps_per_loop": config.runtime.steps_per_loop,
        "runtime.sync_interval_s": config.runtime.sync_interval_s,
        "runtime.slurm_port_base": config.runtime.slurm_port_base,
        "runtime.slurm_port_count": config.runtime.slurm_port_count,
        "runtime.barrier_timeout_s": config.runtime.barrier_timeout_s,
    }
    for name, value in positive.items():
        if value <= 0:
            raise JobError(f"{name} = {value} must be positive.")
    non_negative = {
        "pretext.max_images": config.pretext.max_images,
        "pretext.steps_per_epoch": config.pretext.steps_per_epoch,
        "pretext.weight_decay": config.pretext.weight_decay,
        "finetune.weight_decay": config.finetune.weight_decay,
        "finetune.s4l_rotation_weight": config.finetune.s4l_rotation_weight,
        "finetune.transfer_tolerance_se": config.finetune.transfer_tolerance_se,
        "data.crop_padding": config.data.crop_padding,
    }
    for name, value in non_negative.items():
        if value < 0:
            raise JobError(f"{name} = {value} must be zero or positive.")
    ports = config.runtime.slurm_port_base + config.runtime.slurm_port_count
    if ports > MAX_PORT + 1:
        raise JobError(f"runtime.slurm_port_base + runtime.slurm_port_count = {ports} passes the last port "
                       f"{MAX_PORT}: lower either.")
    if config.data.image_size < 32:
        raise JobError(f"data.image_size = {config.data.image_size} is too small: MobileNetV2 needs >= 32.")
    layers = config.finetune.transfer_layers
    if not layers or ("auto" in layers and len(layers) > 1):
        raise JobError(f"finetune.transfer_layers = {layers} is not allowed: name MobileNetV2 layers, e.g. "
                       "[\"block_12_add\", \"out_relu\"], or [\"auto\"] alone.")
    for section, crops in (("pretext", config.pretext), ("finetune", config.finetune)):
        if not 0.0 < crops.min_crop_area <= 1.0:
            raise JobError(f"{section}.min_crop_area = {crops.min_crop_area} must be in (0, 1]: the smallest "
                           f"share of an image's area a {section} crop covers (1 = no scaling).")
    pretext = config.pretext
    if pretext.colour_order_weight < 0 or not 0.0 < pretext.shuffled_colour_fraction <= 1.0:
        raise JobError(f"pretext.colour_order_weight = {pretext.colour_order_weight} must be >= 0 (0 = no colour-order "
                       f"task) and pretext.shuffled_colour_fraction = {pretext.shuffled_colour_fraction} in (0, 1]: "
                       "the share of the pretext's samples shown in another colour order.")
    fractions = [config.finetune.label_fraction, *config.evaluate.label_fractions]
    if any(not 0.0 < f <= 1.0 for f in fractions):
        raise JobError(f"label fractions {fractions} must each be in (0, 1].")
    e = config.evaluate
    if e.label_fraction_seeds and (len(e.label_fraction_seeds) != len(e.label_fractions)
                                   or min(e.label_fraction_seeds) < 1):
        raise JobError(f"evaluate.label_fraction_seeds = {e.label_fraction_seeds} must hold one positive count for "
                       f"each of evaluate.label_fractions = {e.label_fractions}, or be [] (finetune.seeds for each).")
    wnids, names = config.data.downstream_wnids, config.data.downstream_names
    if len(wnids) != 2 or len(names) != 2 or wnids[0] == wnids[1]:
        raise JobError(
            f"data.downstream_wnids {wnids} and data.downstream_names {names} must name two different classes."
        )
    if config.data.sha256 and not SHA256_HEX.fullmatch(config.data.sha256):
        raise JobError(f"data.sha256 = {config.data.sha256!r} is not a sha256: pass its 64 hex digits "
                       "(e.g. from `sha256sum FILE`), or \"\" to check none.")
    _validate_weights(config.model.weights)
    evaluations = config.evaluate.evaluations
    unknown = [name for name in evaluations if name not in EVALUATIONS]
    if unknown or len(set(evaluations)) != len(evaluations):
        problem = f"has no evaluation {', '.join(map(repr, unknown))}" if unknown else "names one twice"
        raise JobError(f"evaluate.evaluations = {evaluations} {problem}: list each at most once, from "
                       f"{list(EVALUATIONS)}.")
    named = {"evaluate.depth_probe_layers": config.evaluate.depth_probe_layers,
             "finetune.transfer_layers": [name for name in layers if name != "auto"],
             "pretext.frozen_through": [config.pretext.frozen_through] if config.pretext.frozen_through else [],
             "pretext.head_layer": [config.pretext.head_layer]}
    for key, names in named.items():
        if unknown := [name for name in names if name not in mobilenet_v2_layer_names()]:
            raise JobError(f"{key}: MobileNetV2 has no layer {', '.join(map(repr, unknown))}: "
                           "use its layer names, e.g. block_5_add or out_relu.")
    pretext = config.pretext
    if pretext.frozen_through and stage_of(pretext.head_layer) <= stage_of(pretext.frozen_through):
        raise JobError(f"pretext.head_layer = {pretext.head_layer!r} is not in a later block than "
                       f"pretext.frozen_through = {pretext.frozen_through!r}, so the pretext would train no backbone "
                       "layer: name a deeper head layer or a shallower frozen one.")


def _validate_weights(weights: str) -> None:
    """model.weights is 'none', 'imagenet' or an existing Keras weights file (by suffix and signature)."""
    if weights in ("none", "imagenet"):
        return
    path = Path(weights).expanduser()
    if not path.is_file():
        raise JobError(f"model.weights = {weights!r}: use 'none', 'imagenet' or the path of an existing file.")
    suffix = next((s for s in WEIGHTS_SIGNATURES if path.name.endswith(s)), None)
    if suffix is None:
        raise JobError(f"model.weights = {weights!r} is not a weights file: pass a {', '.join(WEIGHTS_SIGNATURES)} "
                       "file (e.g. model/backbone.keras of an earlier run), 'none' or 'imagenet'.")
    signature = WEIGHTS_SIGNATURES[suffix]
    with path.open("rb") as handle:
        if handle.read(len(signature)) != signature:
            raise JobError(f"model.weights = {weights!r} is not a valid {suffix} file (wrong signature): pass a file "
                           "saved by Keras, 'none' or 'imagenet'.")
