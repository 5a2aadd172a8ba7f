"""Language models: loading, text and packing, metrics, layer surgery, KD heal and the top-k teacher cache."""

from kdforge.llm import losses  # noqa: F401 - registers the lm_* loss terms
from kdforge.llm.heal import CalibrationBlocks, LogitDistill, heal_kd, heal_recipe
from kdforge.llm.loading import (
    ByteTokenizer,
    encode,
    load_causal_lm,
    load_smollm2,
    save_causal_lm,
    smollm2_dir,
    tiny_llama,
    vocab_size,
)
from kdforge.llm.metrics import (
    greedy_agreement,
    lm_eval_zero_shot,
    lm_logits,
    lm_loss,
    next_token_targets,
    perplexity,
    tokens_per_second,
)
from kdforge.llm.surgery import decoder_layers, prune_decoder_layers
from kdforge.llm.text import (
    Example,
    Packed,
    block_causal_mask,
    pack,
    pydoc_text,
    read_jsonl,
    read_text,
    split_blocks,
    split_examples,
    text_examples,
    token_blocks,
    tokenize_example,
)

__all__ = [
    "ByteTokenizer", "CalibrationBlocks", "Example", "LogitDistill", "Packed", "block_causal_mask", "decoder_layers",
    "encode", "greedy_agreement", "heal_kd", "heal_recipe", "lm_eval_zero_shot", "lm_logits", "lm_loss",
    "load_causal_lm", "load_smollm2", "next_token_targets", "pack", "perplexity", "prune_decoder_layers",
    "pydoc_text", "read_jsonl", "read_text", "save_causal_lm", "smollm2_dir", "split_blocks", "split_examples",
    "text_examples", "tiny_llama", "token_blocks", "tokenize_example", "tokens_per_second", "vocab_size",
]
