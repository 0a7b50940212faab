"""TrainConfig: every setting of a training run, in one dataclass.

The Python API, a YAML config file and the command line's flags all fill this one dataclass
(defaults, then the file, then the flags). `validate()` gathers every problem, naming the file
or flag each bad value came from, and raises once. The LoRA and data fields are the fields of
LoraConfig and DataConfig, with their defaults and their own validation.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..adapters.files import LoraConfig
from ..data.config import DataConfig
from ..data.packing import BATCHING
from ..errors import OndeviceLoraError, format_list
from .preference import METHODS
from .schedule import OPTIMIZERS, SCHEDULES

# Training length when neither iters nor epochs is given.
DEFAULT_ITERS = 1000
# Bucketed by measurement (benchmarks/README.md; 2 x86 cores, MLX CPU with OpenBLAS). On the
# 88M-parameter Llama with 500 chats (mean 226, max 512 tokens) the two tie within run-to-run
# noise: trained tokens/s over three runs, packed 99.8, 91.1, 104.2 and bucketed 96.1, 96.9,
# 100.7 (medians of the last two runs 97.6 and 98.8), bucketed with the lower validation loss
# after equal tokens (9.040 vs 9.050) and the steadier speed. On a 4-layer, hidden-256 model
# bucketed was up to 10% faster per CPU-second: a packed row attends over its whole width,
# which costs more where attention is a larger share of the model. Packing pads 1% instead of
# 4%, at the same peak memory per token; --batching packed chooses it.
DEFAULT_BATCHING = "bucketed"

_LORA = {f.name: f for f in dataclasses.fields(LoraConfig)}
_DATA = {f.name: f for f in dataclasses.fields(DataConfig)}
LORA_FIELDS = tuple(_LORA)
# DataConfig.path is TrainConfig.data; seed is shared (it also picks the validation split).
DATA_FIELDS = ("max_length", "loss_on", "overlong", "valid_fraction", "mask_prompt", "redact")


class ConfigError(OndeviceLoraError):
    """A training configuration is invalid; the message lists every problem."""


def _default(fields: dict, name: str, help: str):
    """A field with another dataclass's default, so that default is declared only once."""
    f = fields[name]
    if f.default_factory is not dataclasses.MISSING:
        return field(default_factory=f.default_factory, metadata={"help": help})
    return field(default=f.default, metadata={"help": help})


def _help(text: str, default):
    return field(default=default, metadata={"help": text})


@dataclass
class TrainConfig:
    """A training run. `validate()` checks it; `from_yaml()` reads one from a YAML file."""

    model: str | None = _help(
        "Base model: folder, .gguf file or cached Hub id (None: the built-in SmolLM2).", None
    )
    data: str | None = _help(
        "Training data: a .jsonl file, a folder with train.jsonl (valid.jsonl, test.jsonl), "
        "or a folder of .txt/.md notes.",
        None,
    )
    adapter_path: str = _help("Output folder: adapter, checkpoints, metrics.", "adapters")
    # Preference training (training/preference.py): data of chosen/rejected pairs.
    method: str = _help(
        "sft: learn the replies; dpo or orpo: learn preferences from chosen/rejected pairs.", "sft"
    )
    beta: float = _help("DPO: how far the policy may move from the reference.", 0.1)
    orpo_lambda: float = _help("ORPO: weight of the odds-ratio term beside the NLL.", 0.1)
    reference_adapter: str | None = _help(
        "DPO: the reference is the base plus this adapter (the trained one starts from it); "
        "default: the base alone.",
        None,
    )
    # LoRA (see adapters.LoraConfig)
    rank: int = _default(_LORA, "rank", "LoRA rank r.")
    alpha: float = _default(_LORA, "alpha", "LoRA alpha; scale = alpha / rank.")
    dropout: float = _default(_LORA, "dropout", "Dropout on the adapter's input.")
    target_modules: list[str] | str = _default(
        _LORA, "target_modules", 'Layers to adapt, by name (q_proj,v_proj) or "all-linear".'
    )
    num_layers: int | None = _default(
        _LORA, "num_layers", "Adapt only the last N decoder layers (default: all)."
    )
    fine_tune_type: str = _default(_LORA, "fine_tune_type", "lora or dora.")
    use_rslora: bool = _default(_LORA, "use_rslora", "rsLoRA scaling: alpha / sqrt(rank).")
    # Data (see data.DataConfig)
    max_length: int = _default(_DATA, "max_length", "The most tokens in one example.")
    loss_on: str = _default(_DATA, "loss_on", "assistant, last_assistant or all.")
    overlong: str = _default(_DATA, "overlong", "Longer examples: truncate or split.")
    valid_fraction: float = _default(
        _DATA, "valid_fraction", "Held out for validation when there is no valid.jsonl."
    )
    mask_prompt: bool = _default(_DATA, "mask_prompt", "Completions: train only the completion.")
    # Optimisation
    optimizer: str = _help("adamw, adam or sgd.", "adamw")
    learning_rate: float = _help("Peak learning rate.", 1e-4)
    min_learning_rate: float = _help("Where cosine decay ends.", 0.0)
    weight_decay: float = _help("Decoupled weight decay (adamw) or L2 (sgd).", 0.0)
    warmup_steps: int = _help("Linear warmup over this many steps.", 0)
    lr_schedule: str = _help("After warmup: cosine or constant.", "cosine")
    iters: int | None = _help(f"Optimizer steps (default {DEFAULT_ITERS} without epochs).", None)
    epochs: int | None = _help("Passes over the training data, instead of iters.", None)
    batch_size: int = _help("Examples per batch (rows of max_length when packed).", 4)
    batching: str = _help(
        "packed: several examples per row, each seeing only itself; bucketed: one example per "
        "row, padded to the longest of batches of similar length.",
        DEFAULT_BATCHING,
    )
    grad_accumulation: int = _help("Batches per optimizer step.", 1)
    grad_checkpoint: bool = _help("Recompute activations in backward: less memory.", False)
    cache_limit_gb: float | None = _help(
        "Most memory MLX keeps cached for reuse after arrays are freed, GB (None: MLX's).", None
    )
    memory_limit_gb: float | None = _help(
        "Memory MLX aims to stay under, waiting for work in flight to free memory before "
        "allocating more, GB (None: MLX's default).",
        None,
    )
    # Evaluation, checkpoints, stopping
    eval_every: int = _help("Validate every N steps (0: only at the start and end).", 100)
    eval_batches: int = _help("Validation batches per evaluation (-1: all).", 25)
    save_every: int = _help("Checkpoint every N steps (0: only at the end).", 100)
    keep_best: bool = _help("The adapter folder holds the best adapter by validation loss.", True)
    early_stopping_patience: int | None = _help(
        "Stop after this many evaluations without improvement (None: never).", None
    )
    seed: int = _help("Seed for initialisation, data order, validation split and dropout.", 0)
    resume: bool = _help("Continue from the latest checkpoint in adapter_path.", False)
    offline_guard: bool = _help(
        "Refuse network connections, name lookups and new processes while training.", True
    )
    # Privacy (ondevice_lora/privacy): redaction of the data, DP-SGD on the adapter.
    redact: bool = _help(
        "Replace emails, phone numbers, card numbers, IBANs, IPs, SSNs, names and street "
        "addresses in the data by placeholders before training.",
        False,
    )
    dp_epsilon: float | None = _help(
        "Train with differential privacy (DP-SGD) to this epsilon; the noise is solved for it.",
        None,
    )
    dp_delta: float | None = _help("DP delta (None: min(1e-5, 1/N^1.1) for N examples).", None)
    dp_clip: float = _help("DP: each example's gradient is clipped to this L2 norm.", 1.0)
    dp_noise_multiplier: float | None = _help(
        "DP: noise std / clip, instead of solving it from dp_epsilon.", None
    )
    # Distributed (data parallel): the global batch_size is split over the ranks.
    workers: int = _help("Processes on this machine, each training on its share of a batch.", 1)
    hostfile: str | None = _help(
        "mlx.launch hostfile (JSON) of machines to train on together (ring backend).", None
    )

    # --- derived settings ---------------------------------------------------------------------

    def lora_config(self) -> LoraConfig:
        """The LoraConfig these settings describe (stored in adapter_config.json)."""
        return LoraConfig(**{name: getattr(self, name) for name in LORA_FIELDS})

    def data_config(self) -> DataConfig:
        """The DataConfig these settings describe."""
        return DataConfig(
            path=self.data, seed=self.seed, **{n: getattr(self, n) for n in DATA_FIELDS}
        )

    def total_steps(self, batches_per_epoch: int) -> int:
        """Optimizer steps of the whole run, given the batches in one epoch."""
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * batches_per_epoch / self.grad_accumulation))
        return self.iters if self.iters is not None else DEFAULT_ITERS

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # --- validation ---------------------------------------------------------------------------

    def validate(
        self, origins: dict[str, str] | None = None, require_data: bool = True
    ) -> TrainConfig:
        """Raise one ConfigError listing every invalid setting; returns self when all are valid.

        origins: where each key's value came from ("train.yaml", "--rank"), for the message.
        require_data: False when the caller passes examples itself (train()), not a path.
        """
        problems = self._own_problems(require_data) + self._nested_problems()
        if not problems:
            return self
        origins = origins or {}
        lines = [
            f"{origins[key]}: {message}" if key in origins else message for key, message in problems
        ]
        raise ConfigError("invalid training configuration:\n  - " + "\n  - ".join(lines))

    def _own_problems(self, require_data: bool) -> list[tuple[str, str]]:
        problems = []

        def check(key, ok, requirement):
            if not ok:
                problems.append((key, f"{key} must be {requirement}, got {getattr(self, key)!r}"))

        if self.data is None:
            if require_data:
                problems.append(("data", "data is required: the path of your training data"))
        else:
            check("data", isinstance(self.data, (str, Path)) and str(self.data), "a path")
        check("model", self.model is None or isinstance(self.model, (str, Path)), "a path")
        check("adapter_path", isinstance(self.adapter_path, (str, Path)), "a folder path")
        if isinstance(self.adapter_path, (str, Path)) and Path(self.adapter_path).is_file():
            problems.append(
                ("adapter_path", f"adapter_path {str(self.adapter_path)!r} is a file; it must "
                 "be a folder (new, or one an earlier run wrote)")
            )  # fmt: skip
        check("optimizer", _choice(self.optimizer, OPTIMIZERS), f"one of {', '.join(OPTIMIZERS)}")
        check("batching", _choice(self.batching, BATCHING), f"one of {', '.join(BATCHING)}")
        for key in ("cache_limit_gb", "memory_limit_gb"):
            value = getattr(self, key)
            check(key, value is None or (_number(value) and value >= 0), "a number >= 0 or null")
        check("lr_schedule", _choice(self.lr_schedule, SCHEDULES), f"one of {', '.join(SCHEDULES)}")
        check("learning_rate", _number(self.learning_rate) and self.learning_rate > 0, "> 0")
        check("min_learning_rate", _number(self.min_learning_rate), "a number >= 0")
        if (
            _number(self.min_learning_rate)
            and _number(self.learning_rate)
            and self.learning_rate > 0
        ):
            check(
                "min_learning_rate",
                0 <= self.min_learning_rate <= self.learning_rate,
                "between 0 and learning_rate",
            )
        check("weight_decay", _number(self.weight_decay) and self.weight_decay >= 0, ">= 0")
        if self.optimizer == "adam" and _number(self.weight_decay) and self.weight_decay > 0:
            problems.append(
                ("weight_decay", "weight_decay needs optimizer adamw or sgd; adam has none")
            )
        for key in ("warmup_steps", "eval_every", "save_every"):
            check(key, _int(getattr(self, key)) and getattr(self, key) >= 0, "an integer >= 0")
        for key in ("batch_size", "grad_accumulation"):
            check(key, _int(getattr(self, key)) and getattr(self, key) >= 1, "an integer >= 1")
        for key in ("iters", "epochs", "early_stopping_patience"):
            value = getattr(self, key)
            check(key, value is None or (_int(value) and value >= 1), "an integer >= 1 or null")
        if self.iters is not None and self.epochs is not None:
            problems.append(("epochs", "give iters or epochs, not both"))
        check(
            "eval_batches",
            _int(self.eval_batches) and (self.eval_batches >= 1 or self.eval_batches == -1),
            "an integer >= 1, or -1 for all",
        )
        check("seed", _int(self.seed) and self.seed >= 0, "an integer >= 0")
        check("workers", _int(self.workers) and self.workers >= 1, "an integer >= 1")
        if (
            _int(self.workers)
            and self.workers >= 1
            and _int(self.batch_size)
            and (self.batch_size % self.workers)
        ):
            problems.append(
                ("workers", f"batch_size ({self.batch_size}) must be a multiple of workers "
                 f"({self.workers}): each worker trains on an equal share of every batch")
            )  # fmt: skip
        if self.dp_enabled:
            problems += self._dp_problems()
        problems += self._preference_problems()
        if self.hostfile is not None and self.workers != 1:
            problems.append(("hostfile", "give workers or hostfile, not both"))
        for key in ("grad_checkpoint", "keep_best", "resume", "offline_guard"):
            check(key, isinstance(getattr(self, key), bool), "true or false")
        return problems

    @property
    def dp_enabled(self) -> bool:
        return self.dp_epsilon is not None or self.dp_noise_multiplier is not None

    def _dp_problems(self) -> list[tuple[str, str]]:
        problems = []
        if self.dp_epsilon is not None and self.dp_noise_multiplier is not None:
            problems.append(("dp_epsilon", "give dp_epsilon or dp_noise_multiplier, not both"))
        for key in ("dp_epsilon", "dp_noise_multiplier", "dp_clip"):
            value = getattr(self, key)
            if value is not None and not (_number(value) and value > 0):
                problems.append((key, f"{key} must be a number > 0, got {value!r}"))
        if self.dp_delta is not None and not (_number(self.dp_delta) and 0 < self.dp_delta < 1):
            problems.append(("dp_delta", f"dp_delta must be in (0, 1), got {self.dp_delta!r}"))
        for key, ok, why in (
            ("grad_accumulation", self.grad_accumulation == 1, "1 (each step is one sample)"),
            (
                "fine_tune_type",
                self.fine_tune_type == "lora",
                "lora (DoRA is not tiled per example)",
            ),
            ("workers", self.workers == 1 and self.hostfile is None, "1 (DP runs in one process)"),
        ):
            if not ok:
                problems.append((key, f"with DP training, {key} must be {why}"))
        return problems

    def _preference_problems(self) -> list[tuple[str, str]]:
        if self.method not in METHODS:
            return [("method", f"method must be one of {', '.join(METHODS)}, got {self.method!r}")]
        problems = []
        for key in ("beta", "orpo_lambda"):
            value = getattr(self, key)
            if not (_number(value) and value > 0):
                problems.append((key, f"{key} must be a number > 0, got {value!r}"))
        if self.reference_adapter is not None and self.method != "dpo":
            problems.append(
                ("reference_adapter", "reference_adapter is for method dpo (ORPO and SFT use none)")
            )
        if self.method == "sft":
            return problems
        if self.batching != "bucketed":
            problems.append(("batching", f"method {self.method} trains on bucketed pairs only"))
        if self.dp_enabled:
            # Why: see README, "DPO and ORPO": a pair's clipped gradient would need the LoRA
            # factors tiled per pair through two forward passes, which DP-SGD here does not do.
            problems.append(
                ("method", f"method {self.method} cannot be combined with DP-SGD (dp_*) yet")
            )
        return problems

    def _nested_problems(self) -> list[tuple[str, str]]:
        """LoraConfig's and DataConfig's own checks, reported under our keys."""
        problems = []
        try:
            self.lora_config().validate()
        except OndeviceLoraError as e:
            problems += _split_problems(e, LORA_FIELDS)
        data = dataclasses.replace(self, data=self.data if self.data is not None else ".")
        try:
            data.data_config()
        except OndeviceLoraError as e:
            # The data path is ours to check (above); DataConfig's seed check duplicates ours.
            problems += [p for p in _split_problems(e, DATA_FIELDS) if p[0] in DATA_FIELDS]
        return problems

    # --- sources ------------------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path, overrides: dict | None = None, flag_names=None) -> TrainConfig:
        """Read a YAML file of TrainConfig keys; `overrides` (e.g. command-line flags) win.

        Unknown keys and invalid values are errors naming the file (or flag) and the key.
        flag_names: key -> how the override was spelled ("--rank"), for the messages.
        """
        values = read_yaml(path)
        origins = {key: str(path) for key in values}
        return cls.from_sources(values, origins, overrides, flag_names)

    @classmethod
    def from_sources(
        cls, values: dict, origins: dict, overrides: dict | None = None, flag_names=None
    ) -> TrainConfig:
        """Defaults, then `values`, then `overrides`; validated, naming each value's source."""
        overrides = overrides or {}
        check_keys(overrides, "overrides")
        flag_names = flag_names or {}
        origins = {**origins, **{k: flag_names.get(k, k) for k in overrides}}
        values = {**values, **overrides}
        config = cls(**{k: _coerce(k, v) for k, v in values.items()})
        return config.validate(origins)


def check_keys(values: dict, source) -> None:
    """Raise ConfigError for keys that are not TrainConfig fields, suggesting near matches."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    problems = []
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{source}: unknown key {key!r}{hint}")
    if problems:
        raise ConfigError("\n".join(problems) + f"\nKnown keys: {', '.join(names)}.")


def read_yaml(path) -> dict:
    """The mapping in a YAML config file, with unknown keys refused."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found.") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not UTF-8 text ({e.reason} at byte {e.start + 1}); save it as UTF-8."
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; --config takes a YAML file.") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a settings file.") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(values).__name__}.")
    odd = [key for key in values if not isinstance(key, str)]
    if odd:
        raise ConfigError(f"{path}: setting names must be text, got {format_list(odd)}.")
    check_keys(values, path)
    return values


def _coerce(key: str, value):
    # YAML 1.1 reads 1e-4 (no dot) as a string; accept it as the number it clearly is.
    if key in _FLOAT_FIELDS and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if key == "target_modules" and isinstance(value, tuple):
        return list(value)
    return value


_FLOAT_FIELDS = {
    "cache_limit_gb",
    "memory_limit_gb",
    "alpha",
    "dropout",
    "valid_fraction",
    "learning_rate",
    "min_learning_rate",
    "weight_decay",
    "beta",
    "orpo_lambda",
}


def _split_problems(error: Exception, keys) -> list[tuple[str, str]]:
    """(key, message) pairs from a nested config's "- key must be ..." error lines."""
    pairs = []
    for line in str(error).splitlines()[1:]:
        message = line.strip().removeprefix("- ")
        key = message.split(" ", 1)[0]
        pairs.append((key if key in keys else "", message))
    return pairs


def _choice(value, options) -> bool:
    # A list or dict from a YAML file is no option (and not hashable for a dict lookup).
    return isinstance(value, str) and value in options


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
