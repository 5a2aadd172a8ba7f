"""The throughput table of ``make gpu-check``: KD on CIFAR-shaped batches, tiny-Llama KD, peak GPU memory.

``python scripts/gpu_throughput.py`` (on a GPU; no network): ResNet-20 supervised and KD from ResNet-56 on
synthetic 3x32x32 batches (100 classes, batch 128) in fp32 and bf16, and logit KD of a small random Llama
(student 4 layers, teacher 8, width 256, vocabulary 8,192, 8 x 256 tokens a step) in bf16, each through the
engine. Prints a markdown table to paste into docs/benchmarks/gpu.md with the card's name.
``--device cpu --steps 3`` runs the same code on the CPU to check it (numbers meaningless there).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch
from torch.utils.data import TensorDataset

from kdforge.config import Recipe
from kdforge.data import DataBundle
from kdforge.engine.callbacks import Callback
from kdforge.engine.trainer import Trainer
from kdforge.method import DataInfo, build_method


class StepTimes(Callback):
    """Wall time of every optimizer step, synchronised with the device."""

    def __init__(self, device: str) -> None:
        self.device, self.t = device, [time.perf_counter()]

    def on_step_end(self, trainer: Any, out: Any) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.t.append(time.perf_counter())

    def median_s(self, skip: int = 5) -> float:
        """The median step time without the first ``skip`` steps (warm-up, cuDNN autotuning)."""
        dt = [b - a for a, b in zip(self.t, self.t[1:], strict=False)]
        return statistics.median(dt[skip:] if len(dt) > skip else dt)


def _peak_reset(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_mib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


def cifar_bundle(n: int) -> DataBundle:
    """``n`` CIFAR-shaped random images (normalised), 100 classes; a tiny test split."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 100, (n,), generator=g)
    test = TensorDataset(x[:256], y[:256])
    return DataBundle(TensorDataset(x, y), None, test, 100, 3, 32, [str(i) for i in range(100)])


def image_row(name: str, method: dict[str, Any], precision: str, device: str, steps: int) -> dict[str, Any]:
    """Images per second of one image method on synthetic CIFAR batches of 128."""
    batch = 128
    data = cifar_bundle(batch * steps)
    r = Recipe.from_dict({"name": name, "seed": 0, "data": {"batch_size": batch},
                          "method": method, "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
                          "train": {"epochs": 1, "device": device, "precision": precision, "progress": "silent",
                                    "save_checkpoints": False}})
    m = build_method(r.method.model_dump(), DataInfo(100, 3, 32))
    times = StepTimes(device)
    _peak_reset(device)
    Trainer(m, data, r, callbacks=[times]).fit()
    s = times.median_s()
    return {"setting": name, "precision": precision, "step ms": 1000 * s, "throughput": f"{batch / s:,.0f} images/s",
            "peak MiB": _peak_mib(device), "_s": s}


def llama_row(precision: str, device: str, steps: int) -> dict[str, Any]:
    """Tokens per second of logit KD between two random Llamas."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdforge.llm.heal import CalibrationBlocks, LogitDistill

    def llama(layers: int) -> LlamaForCausalLM:
        cfg = LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=layers,
                          num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
        return LlamaForCausalLM(cfg)

    torch.manual_seed(0)
    teacher, student = llama(8), llama(4)
    for p in teacher.parameters():
        p.requires_grad_(False)
    rows, seq = 8, 256
    blocks = torch.randint(0, 8192, (rows * 4, seq), generator=torch.Generator().manual_seed(0))
    r = Recipe.from_dict({"name": "llama-kd", "seed": 0, "data": {"batch_size": rows},
                          "method": {"name": "llm-kd"}, "optim": {"name": "adamw", "lr": 1e-4, "weight_decay": 0.0},
                          "sched": {"name": "constant"},
                          "train": {"max_steps": steps, "device": device, "precision": precision, "grad_clip": 1.0,
                                    "progress": "silent", "save_checkpoints": False}})
    times = StepTimes(device)
    _peak_reset(device)
    Trainer(LogitDistill(student, teacher), None, r, source=CalibrationBlocks(blocks, rows, 0), callbacks=[times]).fit()
    s = times.median_s()
    return {"setting": "tiny-Llama logit KD (8 -> 4 layers)", "precision": precision, "step ms": 1000 * s,
            "throughput": f"{rows * seq / s:,.0f} tokens/s", "peak MiB": _peak_mib(device), "_s": s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per setting (median of those after 5)")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device is visible (use --device cpu --steps 3 to check the script)", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    sup = {"name": "supervised", "model": {"model": "resnet20"}}
    kd = {"name": "distill", "teacher": {"model": "resnet56", "weights": "random"}, "student": {"model": "resnet20"},
          "terms": [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9, "T": 4}]}
    precisions = ["fp32", "bf16"]
    rows = []
    for p in precisions:
        s = image_row("ResNet-20 supervised", sup, p, a.device, a.steps)
        k = image_row("KD ResNet-56 -> ResNet-20", kd, p, a.device, a.steps)
        k["KD / supervised time"] = f"{k['_s'] / s['_s']:.2f}"
        rows += [s, k]
    rows.append(llama_row("bf16", a.device, a.steps))
    card = torch.cuda.get_device_name() if a.device == "cuda" else "CPU (script check only)"
    cols = ["setting", "precision", "step ms", "throughput", "KD / supervised time", "peak MiB"]
    print(f"Card: {card}; torch {torch.__version__}; {a.steps} steps per setting, median of steps 6 on, one run.\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [r.get(c) for c in cols]
        print("| " + " | ".join("" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)
                                for v in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
