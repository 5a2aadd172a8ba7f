"""Language models: loading, text and packing, metrics, layer surgery, KD heal and the top-k teacher cache."""

from kdforge.llm.heal import CalibrationBlocks, LogitDistill, heal_kd, heal_recipe
from kdforge.llm.loading import ByteTokenizer, load_causal_lm, load_smollm2, smollm2_dir, tiny_llama
from kdforge.llm.metrics import lm_eval_zero_shot, lm_logits, lm_loss, perplexity, tokens_per_second
from kdforge.llm.surgery import decoder_layers, prune_decoder_layers
from kdforge.llm.text import pydoc_text, read_text, split_blocks, token_blocks

__all__ = [
    "ByteTokenizer", "CalibrationBlocks", "LogitDistill", "decoder_layers", "heal_kd", "heal_recipe",
    "lm_eval_zero_shot", "lm_logits", "lm_loss", "load_causal_lm", "load_smollm2", "perplexity",
    "prune_decoder_layers", "pydoc_text", "read_text", "smollm2_dir", "split_blocks", "tiny_llama",
    "token_blocks", "tokens_per_second",
]
