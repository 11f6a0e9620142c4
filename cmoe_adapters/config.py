"""`ContinualMoEConfig`: the one place where every switch of the method is visible.

The config is a plain peft `PeftConfig` dataclass, so `save_pretrained` writes it as
`adapter_config.json` and `PeftModel.from_pretrained` reads it back. Besides the hyper-parameters it
carries the *structure* the continual stream has grown so far (`task_records`): loading rebuilds the
same experts and routers from it before the weights are read.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

from peft import PeftConfig

from . import fingerprint, integrity, shards
from ._peft import CONTINUAL_MOE
from .densities import DENSITIES
from .features import POOLINGS

# The published methods as presets (`ContinualMoEConfig.from_preset`); "default" is the plain config.
PRESETS: tuple[str, ...] = ("default", "llava_cmoe", "cl_moe")

# A task name becomes a module-independent key, a directory name and a Hub revision (branch or tag),
# so it must be a valid git ref component. These are the rules of `git check-ref-format` for one
# component, made a little stricter (no spaces, no leading dash) so it is also a safe directory name.
_TASK_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_MAX_TASK_NAME = 100

# Fields that decide which tensors an adapter has and what they mean: an adapter_config.json that
# differs from the copy saved with the weights in one of these does not describe those weights.
STRUCTURE_FIELDS = frozenset(
    {
        "peft_type",
        "r",
        "num_experts",
        "experts_per_task",
        "router_max_experts",
        "target_modules",
        "exclude_modules",
        "modules_to_save",
        "freeze_old_experts",
        "router_per_task",
        "dual_router",
        "task_gate",
        "locator_density",
        "locator_feature_dim",
        "locator_feature_source",
        "locator_pooling",
        "locator_rank",
        "locator_latent_dim",
        "locator_hidden_dim",
        "task_records",
    }
)


def validate_task_name(name: object) -> str:
    """Return `name` if it can name a task (a git ref, a directory), else raise `ValueError` saying why."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"A task name must be a non-empty string, got {name!r}.")
    problems = []
    if len(name) > _MAX_TASK_NAME:
        problems.append(f"it is longer than {_MAX_TASK_NAME} characters")
    if not _TASK_NAME.match(name):
        problems.append("use only letters, digits, '_', '-' and '.', and do not start with '-' or '.'")
    if ".." in name or name.endswith((".", ".lock")):
        problems.append("it may not contain '..' or end with '.' or '.lock' (git refuses such refs)")
    if name in {"main", "master", "HEAD"}:
        problems.append("it is reserved for the branch that holds the latest state")
    if problems:
        raise ValueError(
            f"Task name {name!r} cannot be used: " + "; ".join(problems) + ". Task names become directory "
            "names and Hub revisions, e.g. 'color', 'vqa_v2', 'ocr-vqa'."
        )
    return name


@dataclass
class ContinualMoEConfig(PeftConfig):
    """Configuration of a continual mixture of LoRA experts.

    Each adapted linear layer computes ``W x + s * sum_e g_e(x) B_e A_e x`` with ``s = lora_alpha / r``,
    where the gates ``g`` come from the router of the sample's task (each task has its own router in
    every layer). A new task adds ``experts_per_task`` trainable experts per layer; earlier experts and
    routers are frozen, so earlier tasks keep their exact outputs.

    Args:
        r: rank of each expert. A token's active rank is ``r * top_k`` (``r * num_experts`` when dense).
        lora_alpha: scaling numerator; each expert's output is scaled by ``lora_alpha / r`` as in LoRA.
        lora_dropout: dropout on the experts' input (not on the router's input).
        target_modules: module names (suffix match) or one regex (full match). Default: every linear
            layer of the language model, found per architecture; never the vision tower, projector
            or lm_head.
        exclude_modules: module names or a regex to leave out of `target_modules`.
        num_experts: experts of the first task, in every adapted layer.
        top_k: experts mixed per token; ``None`` routes densely (softmax over all experts).
        experts_per_task: trainable experts each later task adds per layer (default: ``num_experts``;
            ``0`` means later tasks only learn a router over the frozen experts).
        router_aux_loss_coef: weight of the load-balancing loss (Switch/Mixtral style) that
            `ContinualMoETrainer` adds to the task loss; ``0`` disables it.
        router_init_std: standard deviation of the normal init of a new router's weights.
        init_seed: seed of every new expert's and router's initial weights, combined with the task's
            index and the layer's name. A task therefore starts from the same weights whatever ran
            before it and whatever drew from the global RNG (a resumed run, a plain loop, another
            trainer, a different data loader).
        router_max_experts: most experts one task's router chooses among: the task's own new
            experts, then the old experts most useful to it (those the probe phase saw it use, else
            those earlier tasks used most), chosen once when the task is added. A task's router,
            statistics and per-token cost therefore do not grow with the number of tasks before it.
            Default ``max(num_experts, experts_per_task)``: every task routes among as many experts
            as the first, so every task costs per token what the first costs. A larger cap lets
            later tasks also reach old experts, at the cost of a wider dense mixture (or of the
            sparse path's gathers) per token.
        expert_compute: ``"auto"`` (default) computes a task's mixture densely over its candidate
            experts or sparsely (only each token's top-k experts, grouped by expert), whichever is
            faster for its number of candidates, ``top_k``, device and dtype. ``"dense"`` or
            ``"sparse"`` force one (dense routing and the dual router are always dense).
        modules_to_save: extra modules trained in full and saved with the adapter (peft semantics).
        locator_feature_source: what the task locator looks at. ``"first_layer_input"`` (default):
            the input of the first adapted layer, taken inside the forward pass the model does
            anyway (no extra cost; routing does not influence it yet). ``"base_last_hidden"``: the
            frozen base model's last hidden state (LLaVA-CMoE's choice), which costs one extra
            forward pass of the base model whenever tasks are located or features collected.
        locator_pooling: ``"text_image_moments"`` (default): the mean over the prompt's text
            tokens, the mean over its image tokens and their spread (a feature three times the
            hidden size), so neither the question nor the image drowns the other, and an image is
            seen by its texture as well as its average colour; ``"text_image_mean"`` without the
            spread; ``"mean"`` over all prompt tokens; or the ``"last"`` prompt token. Answer tokens
            are never used, in training or at inference.
        locator_density: the model of each task's features. ``"gaussian"`` (default): a low-rank
            Gaussian (probabilistic PCA) fitted in closed form, tasks compared by likelihood.
            ``"vae"``: LLaVA-CMoE's per-task VAE, tasks compared by z-normalised scores. Adapters
            saved before this option existed keep their VAEs. See docs/benchmarks.md.
        locator_rank: principal directions of each task's Gaussian.
        locator_latent_dim: latent size of each task's VAE.
        locator_hidden_dim: hidden size of each task's VAE.
        locator_steps: optimisation steps to fit a task's VAE.
        locator_lr: learning rate of VAE fitting.
        locator_batch_size: batch size of VAE fitting.
        locator_score: the VAE's score, ``"elbo"`` (negative ELBO with the posterior mean) or
            ``"reconstruction"``.
        locator_calibration_fraction: share of a task's features held out to calibrate its scores
            (z-normalisation and the open-set fence).
        locator_open_set: what an input of none of the learnt tasks gets (an input outside every
            task's fence): ``"base"`` (default) the base model's own output for that sample, its
            adapters off (also inside a batch of other tasks); ``"nearest"`` the nearest task's
            experts anyway (LLaVA-CMoE's behaviour); ``"error"`` a `ValueError`.
        locator_open_set_fence: how far beyond its own held-out scores a task still accepts an
            input: its upper quartile plus this many interquartile ranges (a Tukey fence). The
            default 10 is the smallest that rejected none of the learnt tasks' test inputs in
            `benchmarks/locator_open_set.py` (Tukey's "far out" 3 rejected up to 3%); smaller
            catches more unknown inputs and rejects more known ones.
        locator_temperature: softmax temperature turning the scores into probabilities.
        locator_max_features: features kept per task for fitting (reservoir sample).
        locator_feature_dim: set when the first locator is fitted (state; leave it None).
        freeze_old_experts: a new task freezes the experts of earlier tasks (default). ``False``
            keeps every expert trainable across tasks (CL-MoE's shared experts; then earlier tasks'
            outputs change, and ``momentum_merge`` limits how much).
        router_per_task: every task gets its own router (default). ``False``: one router shared
            and trained by all tasks (the MoE-LoRA baseline; needs ``experts_per_task=0``).
        expansion: LLaVA-CMoE's probe-guided knowledge extension. Before each task after the
            first, ``expansion_probe_experts`` probe experts are trained briefly in every layer on
            ``expansion_probe_fraction`` of the task's data; a layer gets ``experts_per_task`` new
            experts only when its probes' activation frequency exceeds ``mean - expansion_alpha *
            std`` over layers, each initialised from the old expert the probe phase used most.
        dual_router: CL-MoE's dual router: gates = ``dual_router_beta`` * instance gates +
            (1 - beta) * the task-level gate of the (given or located) task.
        task_gate: ``"usage"``: the task-level gate is the task's expert-usage share counted over
            its training (top-k per token, as CL-MoE's reference); ``"learned"``: a trained softmax.
        momentum_merge: CL-MoE's momentum merge after each task: ``theta_e = lambda_e *
            theta_e(before) + (1 - lambda_e) * theta_e(after)`` with ``momentum_shared`` for experts
            earlier tasks also use and ``momentum_new`` for experts only the new task uses. An expert
            counts as used when its usage share is at least ``momentum_usage_threshold / E``.
        task_records: the grown structure, one record per task in order (written by ``add_task``;
            leave it empty when creating a config).
        base_model_fingerprint: the base model the adapter was created on: its architecture, the
            shapes of the adapted layers and a digest of two of their weights (written when the
            adapter is created, checked when it is loaded; see `cmoe_adapters.fingerprint`; leave it
            None).
    """

    r: int = field(default=8, metadata={"help": "Rank of each LoRA expert."})
    lora_alpha: float = field(
        default=16, metadata={"help": "LoRA scaling numerator (scale = lora_alpha / r)."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the experts' input."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Modules to adapt (suffixes or one regex); default: the language model's linears."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules to leave out (suffixes or one regex)."}
    )
    num_experts: int = field(
        default=4, metadata={"help": "Experts of the first task in every adapted layer."}
    )
    top_k: int | None = field(default=2, metadata={"help": "Experts per token; None for dense routing."})
    experts_per_task: int | None = field(
        default=None,
        metadata={"help": "New trainable experts per later task and layer (default num_experts)."},
    )
    router_aux_loss_coef: float = field(default=0.01, metadata={"help": "Weight of the load-balancing loss."})
    router_init_std: float = field(default=0.02, metadata={"help": "Std of the normal init of new routers."})
    init_seed: int = field(default=0, metadata={"help": "Seed of new experts' and routers' initial weights."})
    router_max_experts: int | None = field(
        default=None,
        metadata={"help": "Most experts one task's router chooses among (default: as many as task 1's)."},
    )
    expert_compute: str = field(
        default="auto", metadata={"help": "'auto', 'dense' or 'sparse' computation of the mixture."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules trained in full and saved with the adapter."}
    )
    locator_feature_source: str = field(
        default="first_layer_input", metadata={"help": "'first_layer_input' (free) or 'base_last_hidden'."}
    )
    locator_pooling: str = field(
        default="text_image_moments",
        metadata={"help": "'text_image_moments', 'text_image_mean', 'mean' or 'last' prompt token."},
    )
    locator_density: str | None = field(
        default=None, metadata={"help": "'gaussian' (default) or 'vae' (LLaVA-CMoE) per-task density."}
    )
    locator_rank: int = field(default=32, metadata={"help": "Principal directions of each task's Gaussian."})
    locator_open_set: str = field(
        default="base", metadata={"help": "Inputs of no learnt task: 'base', 'nearest' or 'error'."}
    )
    locator_open_set_fence: float = field(
        default=10.0, metadata={"help": "Interquartile ranges beyond a task's held-out scores it accepts."}
    )
    locator_latent_dim: int = field(default=16, metadata={"help": "Latent size of each task's VAE."})
    locator_hidden_dim: int = field(default=128, metadata={"help": "Hidden size of each task's VAE."})
    locator_steps: int = field(default=600, metadata={"help": "Optimisation steps to fit a task's VAE."})
    locator_lr: float = field(default=1e-3, metadata={"help": "Learning rate of VAE fitting."})
    locator_batch_size: int = field(default=64, metadata={"help": "Batch size of VAE fitting."})
    locator_score: str = field(default="elbo", metadata={"help": "'elbo' or 'reconstruction'."})
    locator_calibration_fraction: float = field(
        default=0.2, metadata={"help": "Share of a task's features held out to calibrate its scores."}
    )
    locator_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of locating."})
    locator_max_features: int = field(default=4096, metadata={"help": "Features kept per task for fitting."})
    locator_feature_dim: int | None = field(default=None, metadata={"help": "Set at the first fit (state)."})
    freeze_old_experts: bool = field(default=True, metadata={"help": "Freeze earlier tasks' experts."})
    router_per_task: bool = field(default=True, metadata={"help": "One router per task (else one shared)."})
    expansion: bool = field(default=False, metadata={"help": "Probe-guided expert expansion (LLaVA-CMoE)."})
    expansion_alpha: float = field(default=1.0, metadata={"help": "Expand where freq > mean - alpha * std."})
    expansion_probe_fraction: float = field(default=0.1, metadata={"help": "Share of data for probing."})
    expansion_probe_experts: int = field(default=1, metadata={"help": "Probe experts per layer."})
    dual_router: bool = field(default=False, metadata={"help": "Instance + task-level router (CL-MoE)."})
    dual_router_beta: float = field(default=0.5, metadata={"help": "Weight of the instance-level gates."})
    task_gate: str = field(default="usage", metadata={"help": "'usage' statistics or 'learned'."})
    momentum_merge: bool = field(default=False, metadata={"help": "Momentum merge of experts (CL-MoE)."})
    momentum_shared: float = field(default=0.7, metadata={"help": "lambda of experts shared with old tasks."})
    momentum_new: float = field(default=0.3, metadata={"help": "lambda of experts only the new task uses."})
    momentum_usage_threshold: float = field(default=0.5, metadata={"help": "Used if share >= this / E."})
    task_records: list[dict[str, Any]] = field(
        default_factory=list, metadata={"help": "The tasks learnt so far and the experts each added (state)."}
    )
    base_model_fingerprint: dict[str, Any] | None = field(
        default=None, metadata={"help": "The base model the adapter was created on (state)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = CONTINUAL_MOE
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if self.experts_per_task is None:
            self.experts_per_task = self.num_experts
        counts = (self.num_experts, self.experts_per_task)
        if self.router_max_experts is None and all(isinstance(n, int) for n in counts):
            self.router_max_experts = max(counts)
        if self.locator_density is None:  # a fitted locator saved before the option existed: VAEs
            self.locator_density = "vae" if self.locator_feature_dim is not None else "gaussian"
        self._validate()

    # -- saving and loading (see shards.py) -------------------------------------------------------

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write ``adapter_config.json``; inside `PeftModel.save_pretrained`, also split the weights.

        peft calls this right after writing ``adapter_model.safetensors`` to the same directory (and
        passes ``auto_mapping_dict``): the finished tasks' tensors then move to per-task shard files.
        """
        called_by_peft_model = "auto_mapping_dict" in kwargs
        super().save_pretrained(save_directory, **kwargs)
        if called_by_peft_model:
            shards.write_layout(save_directory, self)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str,
        subfolder: str | None = None,
        strict_base_check: bool | None = None,
        **kwargs: Any,
    ) -> ContinualMoEConfig:
        """peft's loading, plus where it was loaded from (so that loading finds the task shards),
        and the checks of `integrity` on the config and the main file before peft reads it.

        ``strict_base_check=True`` (also given to ``PeftModel.from_pretrained``) makes a base model
        with other weights than the adapter's an error rather than a warning (see `fingerprint`).
        """
        source = shards.source_for(pretrained_model_name_or_path, subfolder, **kwargs)
        try:
            config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        except ValueError as error:
            invalid = str(error).startswith(f"Invalid {cls.__name__}")
            if isinstance(error, integrity.AdapterFileError) or not invalid:
                raise
            label = integrity.describe_source(source, integrity.CONFIG_FILE)
            raise integrity.AdapterFileError(
                f"{label} was damaged or edited: it is not a valid {cls.__name__}. {error}\n"
                f"{integrity.recovery_hint(source)}"
            ) from error
        shards.remember_source(config, pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        fingerprint.set_strict(config, strict_base_check)
        manifest = shards.check_main_file(config)
        if manifest is not None and manifest.get("config") is not None:
            config._check_saved_copy(manifest["config"], source)
        return config

    def _check_saved_copy(self, saved: dict[str, Any], source: shards.ShardSource) -> None:
        """Compare this loaded config with the copy of ``adapter_config.json`` saved with the weights.

        A difference in what shapes the tensors (`STRUCTURE_FIELDS`) means the file does not describe
        the weights: an error. Any other difference is an edit or damage that loads: a warning.
        """
        loaded = json.loads(json.dumps(self.to_dict(), default=str))
        differing = sorted(
            key
            for key in set(saved) & set(loaded)
            if key not in shards.CONFIG_COPY_IGNORED and saved[key] != loaded[key]
        )
        if not differing:
            return
        label = integrity.describe_source(source, integrity.CONFIG_FILE)

        def show(key: str) -> str:
            def short(value: Any) -> str:
                text = repr(value)
                return text if len(text) <= 120 else text[:117] + "..."

            return f"{key}={short(loaded[key])} (saved with the weights: {short(saved[key])})"

        structural = [key for key in differing if key in STRUCTURE_FIELDS]
        if structural:
            raise integrity.AdapterFileError(
                f"{label} does not describe the weights saved with it: "
                + "; ".join(show(key) for key in structural)
                + f". It was damaged or edited. {integrity.recovery_hint(source, self.task_names)}"
            )
        warnings.warn(
            f"{label} differs from the copy saved with the weights: "
            + "; ".join(show(key) for key in differing)
            + ". Loading with the file's values; if this was not an edit of yours, the file is damaged.",
            UserWarning,
            stacklevel=4,
        )

    # -- validation -------------------------------------------------------------------------------

    def _validate(self) -> None:
        errors = []

        def is_int(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not is_int(self.r) or self.r < 1:
            errors.append(f"r={self.r!r}: the expert rank must be an integer >= 1.")
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            errors.append(f"lora_alpha={self.lora_alpha!r}: must be a positive number.")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            errors.append(f"lora_dropout={self.lora_dropout!r}: must be in [0, 1).")
        if not is_int(self.num_experts) or self.num_experts < 1:
            errors.append(f"num_experts={self.num_experts!r}: must be an integer >= 1.")
        if not is_int(self.experts_per_task) or self.experts_per_task < 0:
            errors.append(
                f"experts_per_task={self.experts_per_task!r}: must be an integer >= 0 "
                "(0 = later tasks only learn a router over the frozen experts)."
            )
        if self.top_k is not None:
            if not is_int(self.top_k) or self.top_k < 1:
                errors.append(f"top_k={self.top_k!r}: must be an integer >= 1, or None for dense routing.")
            elif is_int(self.num_experts) and self.top_k > self.num_experts:
                errors.append(
                    f"top_k={self.top_k} exceeds num_experts={self.num_experts}: lower top_k, raise "
                    "num_experts, or set top_k=None for dense routing."
                )
        if is_int(self.num_experts) and is_int(self.experts_per_task):
            needed = max(self.num_experts, self.experts_per_task)
            if not is_int(self.router_max_experts) or self.router_max_experts < needed:
                errors.append(
                    f"router_max_experts={self.router_max_experts!r}: a task's router must reach at least "
                    f"its own new experts (num_experts={self.num_experts}, experts_per_task="
                    f"{self.experts_per_task}): set it >= {needed}, or leave it None."
                )
        if not isinstance(self.router_aux_loss_coef, (int, float)) or self.router_aux_loss_coef < 0:
            errors.append(f"router_aux_loss_coef={self.router_aux_loss_coef!r}: must be >= 0.")
        if not is_int(self.init_seed) or self.init_seed < 0:
            errors.append(f"init_seed={self.init_seed!r}: must be an integer >= 0.")
        if not isinstance(self.router_init_std, (int, float)) or self.router_init_std < 0:
            errors.append(f"router_init_std={self.router_init_std!r}: must be >= 0.")
        for attr in ("target_modules", "exclude_modules"):
            value = getattr(self, attr)
            if value is None or isinstance(value, str):
                if isinstance(value, str):
                    try:
                        re.compile(value)
                    except re.error as exc:
                        errors.append(f"{attr}={value!r} is not a valid regular expression: {exc}.")
                continue
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                errors.append(f"{attr}={value!r}: must be a list of module names or one regex string.")
            elif attr == "target_modules" and not value:
                errors.append(
                    "target_modules=[] adapts nothing: leave it None for the architecture's default."
                )
        if not self.router_per_task and self.experts_per_task != 0:
            errors.append(
                "router_per_task=False shares one router over a fixed set of experts: set "
                f"experts_per_task=0 (got {self.experts_per_task})."
            )
        if self.momentum_merge and self.freeze_old_experts:
            errors.append(
                "momentum_merge=True blends experts that the new task trained, but freeze_old_experts=True "
                "keeps every earlier expert frozen: set freeze_old_experts=False (as "
                "ContinualMoEConfig.cl_moe does)."
            )
        if self.expansion and self.experts_per_task == 0:
            errors.append("expansion=True adds experts where probes say so: experts_per_task must be >= 1.")
        for attr in ("dual_router_beta", "momentum_shared", "momentum_new"):
            value = getattr(self, attr)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                errors.append(f"{attr}={value!r}: must be in [0, 1].")
        if (
            not isinstance(self.expansion_probe_fraction, (int, float))
            or not 0 < self.expansion_probe_fraction <= 1
        ):
            errors.append(f"expansion_probe_fraction={self.expansion_probe_fraction!r}: must be in (0, 1].")
        if not is_int(self.expansion_probe_experts) or self.expansion_probe_experts < 1:
            errors.append(
                f"expansion_probe_experts={self.expansion_probe_experts!r}: must be an integer >= 1."
            )
        if not isinstance(self.expansion_alpha, (int, float)):
            errors.append(f"expansion_alpha={self.expansion_alpha!r}: must be a number.")
        if not isinstance(self.momentum_usage_threshold, (int, float)) or self.momentum_usage_threshold < 0:
            errors.append(f"momentum_usage_threshold={self.momentum_usage_threshold!r}: must be >= 0.")
        choices = {
            "task_gate": ("usage", "learned"),
            "expert_compute": ("auto", "dense", "sparse"),
            "locator_feature_source": ("first_layer_input", "base_last_hidden"),
            "locator_pooling": POOLINGS,
            "locator_score": ("elbo", "reconstruction"),
            "locator_density": DENSITIES,
            "locator_open_set": ("base", "nearest", "error"),
        }
        for attr, allowed in choices.items():
            if getattr(self, attr) not in allowed:
                options = ", ".join(map(repr, allowed))
                errors.append(f"{attr}={getattr(self, attr)!r}: choose one of {options}.")
        fence = self.locator_open_set_fence
        if not isinstance(fence, (int, float)) or isinstance(fence, bool) or fence < 0:
            errors.append(f"locator_open_set_fence={fence!r}: must be a number >= 0.")
        for attr in (
            "locator_latent_dim",
            "locator_hidden_dim",
            "locator_rank",
            "locator_steps",
            "locator_batch_size",
        ):
            if not is_int(getattr(self, attr)) or getattr(self, attr) < 1:
                errors.append(f"{attr}={getattr(self, attr)!r}: must be an integer >= 1.")
        if not is_int(self.locator_max_features) or self.locator_max_features < 2:
            errors.append(f"locator_max_features={self.locator_max_features!r}: must be an integer >= 2.")
        if not isinstance(self.locator_lr, (int, float)) or self.locator_lr <= 0:
            errors.append(f"locator_lr={self.locator_lr!r}: must be > 0.")
        if not isinstance(self.locator_temperature, (int, float)) or self.locator_temperature <= 0:
            errors.append(f"locator_temperature={self.locator_temperature!r}: must be > 0.")
        fraction = self.locator_calibration_fraction
        if not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
            errors.append(f"locator_calibration_fraction={fraction!r}: must be in (0, 1).")
        if self.base_model_fingerprint is not None and not isinstance(self.base_model_fingerprint, dict):
            errors.append("base_model_fingerprint is written when the adapter is created; leave it None.")
        if not isinstance(self.task_records, list):
            errors.append("task_records must be a list (it is written by add_task; leave it empty).")
        else:
            seen: set[str] = set()
            for record in self.task_records:
                name = record.get("name") if isinstance(record, dict) else None
                try:
                    validate_task_name(name)
                except ValueError as exc:
                    errors.append(f"task_records: {exc}")
                    continue
                if name in seen:
                    errors.append(f"task_records: task {name!r} appears twice.")
                seen.add(name)
        if errors:
            raise ValueError("Invalid ContinualMoEConfig:\n  - " + "\n  - ".join(errors))

    # -- presets ----------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, preset: str | None, **overrides: Any) -> ContinualMoEConfig:
        """The config of `preset` (one of `PRESETS`; ``"default"`` or None: the plain defaults),
        with `overrides` on top: the one preset table the CLI, the demo and the examples share."""
        if preset in (None, "default"):
            return cls(**overrides)
        if preset not in PRESETS:
            raise ValueError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
        return getattr(cls, preset)(**overrides)

    @classmethod
    def llava_cmoe(cls, **overrides: Any) -> ContinualMoEConfig:
        """LLaVA-CMoE: probe-guided expansion, a router per task, frozen old experts, a task locator.

        The paper does not give its expert counts; these defaults add 2 experts of rank 8 per
        expanded layer with top-2 routing. The locator is the library's default (a Gaussian per
        task, which locates image-only differences the paper's VAE misses, see docs/benchmarks.md);
        ``locator_density="vae"`` gives the paper's. Every field can be overridden.
        """
        settings: dict[str, Any] = {
            "r": 8,
            "lora_alpha": 16,
            "num_experts": 4,
            "top_k": 2,
            "experts_per_task": 2,
            "expansion": True,
            "expansion_alpha": 1.0,
            "expansion_probe_fraction": 0.1,
            "expansion_probe_experts": 1,
            "router_per_task": True,
            "freeze_old_experts": True,
        }
        return cls(**{**settings, **overrides})

    @classmethod
    def cl_moe(cls, **overrides: Any) -> ContinualMoEConfig:
        """CL-MoE: 4 shared experts of rank 8 (alpha 16, the reference's r=32/alpha=64 split),
        top-2, dual router with beta=0.5 and usage-based task gates, momentum merge 0.7/0.3.

        Experts stay trainable across tasks (that is what the momentum merge is for); each task
        still gets its own instance router, and the locator supplies the task-level gate's task.
        """
        settings: dict[str, Any] = {
            "r": 8,
            "lora_alpha": 16,
            "num_experts": 4,
            "top_k": 2,
            "experts_per_task": 0,
            "freeze_old_experts": False,
            "dual_router": True,
            "dual_router_beta": 0.5,
            "task_gate": "usage",
            "momentum_merge": True,
            "momentum_shared": 0.7,
            "momentum_new": 0.3,
        }
        return cls(**{**settings, **overrides})

    # -- task structure ---------------------------------------------------------------------------

    @property
    def task_names(self) -> list[str]:
        """Task names in the order they were added."""
        return [record["name"] for record in self.task_records]

    def router_experts_for(self, task_index: int) -> int | None:
        """The cap on the experts the router of task `task_index` chooses among (None: all).

        Stored in the task's record when it is added: records written before the cap existed, and
        the probe phase's temporary task, route among every expert.
        """
        return self.task_records[task_index].get("router_max_experts")

    def new_experts_for(self, task_index: int, layer_name: str) -> int:
        """How many experts the task at `task_index` added in the layer `layer_name`.

        The first task creates `num_experts`; each later one `experts_per_task`, unless its record
        restricts growth to some layers (`expanded_layers`) or sets its own count (`new_experts`).
        """
        record = self.task_records[task_index]
        count = record.get("new_experts")
        if count is None:
            count = self.num_experts if task_index == 0 else self.experts_per_task
        expanded = record.get("expanded_layers")
        if expanded is not None and layer_name not in expanded:
            return 0
        return int(count)
