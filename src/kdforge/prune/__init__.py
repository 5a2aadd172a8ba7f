"""Layer pruning: SGLP (CKA + Fisher segmentation + GradNorm) and baselines, for residual CNNs and LLMs."""

from kdforge.prune.cka import CKAStream, cka, cka_matrix, collect_cka, hsic_biased, hsic_unbiased
from kdforge.prune.importance import Selection, grad_norm, select_baseline, sglp_select
from kdforge.prune.segment import Segmentation, choose_k, fisher_dp, segment
from kdforge.prune.surgery import UnitSpec, find_units, load_pruned, prune_model, save_pruned

__all__ = [
    "CKAStream", "Segmentation", "Selection", "UnitSpec", "choose_k", "cka", "cka_matrix", "collect_cka",
    "find_units", "fisher_dp", "grad_norm", "hsic_biased", "hsic_unbiased", "load_pruned", "prune_model",
    "save_pruned", "segment", "select_baseline", "sglp_select",
]
