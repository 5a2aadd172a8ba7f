"""The short probe that set the heal of ``kdforge bench compress-llm``: steps and lr on Austen's other novels.

SmolLM2-135M with block influence's layer set (as the bench picks it on pydoc: 21/30 or 15/30 layers) is healed
by logit KD from the original on the bench's heal text, and its perplexity on the held-out book (Persuasion) is
printed every ``--every`` steps. One pinned core::

    OMP_NUM_THREADS=1 taskset -c 0 python scripts/compress_llm_heal_probe.py --keep 21 --lr 2e-4 --steps 75
    OMP_NUM_THREADS=1 taskset -c 0 python scripts/compress_llm_heal_probe.py --keep 15 --lr 2e-4 --steps 50
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from kdforge.bench.compress_llm import HEAL_BOOKS, HELD_OUT
from kdforge.compress.llm import load_lm_source
from kdforge.compress.recipe import CompressRecipe
from kdforge.engine.callbacks import Callback
from kdforge.llm.heal import heal_kd, heal_recipe
from kdforge.llm.metrics import perplexity
from kdforge.prune.surgery import find_units, prune_model

#: the layers block influence removes on the bench's pydoc rows (docs/benchmarks/compress-llm.md)
REMOVED = {21: [3, 12, 13, 14, 15, 16, 17, 25, 26], 15: [2, 3, 4, 5, 6, 7, 9, 12, 13, 14, 15, 16, 17, 25, 26]}


def main() -> None:
    """Heal one layer set and print held-out perplexity along the way."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=int, choices=sorted(REMOVED), default=21)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--steps", type=int, default=75)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--T", type=float, default=4.0)
    a = ap.parse_args()
    t0 = time.perf_counter()
    r = CompressRecipe.from_dict({
        "llm": {"source": "smollm2"}, "candidates": {"families": ["block_influence"]},
        "text": {"calib": "pydoc", "eval": HELD_OUT, "heal": HEAL_BOOKS, "seq_len": 128, "eval_sequences": 8,
                 "calib_sequences": 64, "heal_sequences": 512}})
    src = load_lm_source(r)
    assert src.heal is not None
    units = find_units(src.model)
    student = prune_model(src.model, units, [i for i in range(len(units)) if i not in REMOVED[a.keep]])
    print(f"load {time.perf_counter() - t0:.0f} s; {len(src.heal)} heal rows; perplexity original "
          f"{perplexity(src.model, src.eval):.2f}, {a.keep}/{len(units)} unhealed {perplexity(student, src.eval):.2f}",
          flush=True)
    t1 = time.perf_counter()

    class Every(Callback):
        def on_step_end(self, trainer: Any, out: dict[str, Any]) -> None:
            if trainer.global_step % a.every == 0:
                print(f"step {trainer.global_step} KD loss {float(out['loss'].detach()):.3f} held-out perplexity "
                      f"{perplexity(student, src.eval):.2f} ({time.perf_counter() - t1:.0f} s)", flush=True)

    heal_kd(student, src.model, src.heal, recipe=heal_recipe(a.steps, a.lr, 2, 0), T=a.T, callbacks=[Every()])


if __name__ == "__main__":
    main()
