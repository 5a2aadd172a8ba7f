"""LM distillation on tiny random Llamas: the method, vocabularies, top-k cache, on-policy and stored teacher text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from kdforge.errors import KdforgeError
from kdforge.llm import ByteTokenizer, prune_decoder_layers, tiny_llama
from kdforge.llm.distill import (
    LMDistill,
    OnPolicy,
    PackedRows,
    check_vocab,
    distill_lm,
    distill_recipe,
    teacher_generations,
)
from kdforge.llm.text import pack, tokenize_example
from kdforge.losses import build_loss


def _examples(n: int = 12) -> list:
    tok = ByteTokenizer()
    rows = [{"prompt": f"Q{i}: what is {i} plus {i}? ", "response": f"It is {2 * i}."} for i in range(n)]
    return [tokenize_example(tok, r, "plain") for r in rows]


def _pair(vocab: int = 256) -> tuple[torch.nn.Module, torch.nn.Module]:
    teacher = tiny_llama(4, vocab=vocab, seed=1)
    return teacher, prune_decoder_layers(teacher, [0, 3])


def test_vocab_mismatch_is_refused_naming_both() -> None:
    class Other:
        name_or_path = "other-tok"

        def __len__(self) -> int:
            return 300

    with pytest.raises(KdforgeError, match=r"'ByteTokenizer' \(256 tokens\).*'other-tok' \(300 tokens\)"):
        check_vocab(ByteTokenizer(), Other())
    small = tiny_llama(2, vocab=200)
    with pytest.raises(KdforgeError, match="200 rows, fewer than its tokenizer's 256"):
        check_vocab(ByteTokenizer(), ByteTokenizer(), small, None)


def test_padded_head_rows_are_cropped() -> None:
    teacher, student = _pair(vocab=320)  # heads padded beyond the 256 byte tokens
    vocab = check_vocab(ByteTokenizer(), ByteTokenizer(), student, teacher)
    assert vocab == 256
    batch = pack(_examples(4), 64).rows(torch.arange(2))
    m = LMDistill(student, teacher, [(build_loss("lm_rkl"), 1.0)], vocab=vocab)
    got = float(m.training_step(batch, 0)["loss"].detach())
    from kdforge.llm.metrics import lm_logits

    with torch.no_grad():
        s, t = lm_logits(student, batch)[..., :256], lm_logits(teacher, batch)[..., :256]
    keep = batch["targets"] != -100
    ls, lt = s[keep].log_softmax(-1), t[keep].log_softmax(-1)
    want = float((ls.exp() * (ls - lt)).sum(-1).mean())  # reverse KL on the tokenizer's rows only
    assert got == pytest.approx(want, rel=1e-5)
    whole = LMDistill(student, teacher, [(build_loss("lm_rkl"), 1.0)])
    uncropped = float(whole.training_step(batch, 0)["loss"].detach())
    assert abs(uncropped - want) > 1e-4  # the padded rows would have changed it


def test_live_distill_learns_and_logs_terms() -> None:
    teacher, student = _pair()
    packed = pack(_examples(), 48)
    mixed = LMDistill(student, teacher, [(build_loss("lm_jsd", beta=0.5), 1.0), (build_loss("lm_ce"), 0.5)])
    out = mixed.training_step(PackedRows(packed, 4, seed=0).batch(0), 0)
    assert float(out["loss"]) == pytest.approx(float(out["lm_jsd"]) + 0.5 * float(out["lm_ce"]), rel=1e-5)
    m = LMDistill(student, teacher, [(build_loss("lm_jsd", beta=0.5), 1.0)])
    logs = distill_lm(m, PackedRows(packed, 4, seed=0), distill_recipe(steps=10, lr=3e-3, batch_size=4))
    assert len(logs) == 10 and {"loss", "lm_jsd"} <= logs[0].keys()
    assert sum(r["lm_jsd"] for r in logs[-3:]) < 0.5 * sum(r["lm_jsd"] for r in logs[:3])


def test_topk_cache_forward_kl_and_refusals(tmp_path: Path) -> None:
    from kdforge.llm.cache import CachedBlocks, CachedLogitDistill, LMTopKCache

    teacher, student = _pair()
    blocks = torch.randint(1, 256, (6, 24), generator=torch.Generator().manual_seed(0))
    cache = LMTopKCache.build(teacher, blocks, tmp_path / "c", k=8)
    with pytest.raises(KdforgeError, match="lm_rkl needs the teacher's whole distribution"):
        LMDistill(student, None, [(build_loss("lm_rkl"), 1.0)], cache=cache)
    with pytest.raises(KdforgeError, match="lm_jsd needs"):
        LMDistill(student, None, [(build_loss("lm_jsd", beta=0.5), 1.0)], cache=cache)
    m = LMDistill(student, None, [(build_loss("lm_fkl", T=2.0), 1.0)], cache=cache)
    batch = CachedBlocks(blocks, 3, seed=1).batch(0)
    got = float(m.training_step(batch, 0)["loss"])
    # the older, separately written bucket distillation of the cache (all positions but the last: no target)
    ref = CachedLogitDistill(student, cache, T=2.0)
    ids = batch["ids"][:, :-1]
    s_logits = student(input_ids=batch["ids"]).logits[:, :-1]
    from kdforge.llm.cache import bucket_kd

    t_ids, t_lp = cache.bucket_log_probs(batch["rows"], 2.0)
    want = float(bucket_kd(s_logits, t_ids[:, :-1], t_lp[:, :-1], 2.0))
    # a KL of ~7e-4 summed from O(1) float32 terms: both sides round at ~1e-7 (each within 3e-7 of float64)
    assert got == pytest.approx(want, abs=1e-6, rel=1e-3)
    assert ids.shape[1] == 23 and ref is not None
    # packed rows can be cached too
    packed = pack(_examples(6), 40)
    pc = LMTopKCache.build(teacher, packed, tmp_path / "p", k=8)
    pm = LMDistill(student, None, [(build_loss("lm_fkl"), 1.0)], cache=pc)
    live = LMDistill(student, teacher, [(build_loss("lm_fkl"), 1.0)])
    b = PackedRows(packed, 2, seed=0).batch(0)
    assert float(pm.training_step(b, 0)["loss"]) < float(live.training_step(b, 0)["loss"]) + 1e-4


def test_on_policy_is_seeded_and_mixes(tmp_path: Path) -> None:
    _, student = _pair()
    src = OnPolicy(_examples(), student, batch_size=2, seq_len=64, lam=0.5, max_new_tokens=8, seed=5, eos_id=0)
    plans = [src.plan(s)[1] for s in range(12)]
    assert any(plans) and not all(plans)
    step = plans.index(True)
    a, b = src.batch(step), src.batch(step)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = OnPolicy(_examples(), student, batch_size=2, seq_len=64, lam=0.5, max_new_tokens=8, seed=6, eos_id=0)
    # the student's sampled answer is trained on, the prompt is not
    exs = src.examples
    idx, _ = src.plan(step)
    n_prompt = exs[idx[0]].n_prompt
    assert torch.equal(a["ids"][0, :n_prompt], torch.tensor(exs[idx[0]].ids[:n_prompt]))
    assert (a["targets"][0, : n_prompt - 1] == -100).all() and (a["targets"][0, n_prompt - 1] != -100)
    answer = exs[idx[0]].ids[n_prompt:]
    assert a["ids"][0, n_prompt: n_prompt + len(answer)].tolist() != answer  # the student's text, not the data's
    assert [other.plan(s) for s in range(12)] != [src.plan(s) for s in range(12)]


def test_on_policy_resume_is_bit_identical(tmp_path: Path) -> None:
    from kdforge.engine.callbacks import Callback

    teacher = tiny_llama(4, seed=1)
    recipe = distill_recipe(steps=6, lr=3e-3, batch_size=2, seed=3, save_checkpoints=True, save_every_steps=1)

    def run(run_dir: Path | None, resume: bool = False, callbacks=()) -> tuple[list, torch.nn.Module]:
        student = prune_decoder_layers(teacher, [0, 3])
        src = OnPolicy(_examples(), student, batch_size=2, seq_len=64, lam=0.5, max_new_tokens=6, seed=3, eos_id=0)
        m = LMDistill(student, teacher, [(build_loss("lm_rkl"), 1.0)])
        return distill_lm(m, src, recipe, run_dir, resume, callbacks), student

    full_logs, full = run(None)
    src = OnPolicy(_examples(), full, batch_size=2, seq_len=64, lam=0.5, max_new_tokens=6, seed=3)
    assert {src.plan(s)[1] for s in range(6)} == {True, False}  # both kinds of step happen in the run

    class Kill(Callback):
        def on_step_end(self, trainer, out) -> None:  # type: ignore[no-untyped-def]
            if trainer.global_step == 4:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "r", callbacks=[Kill()])
    rest, resumed = run(tmp_path / "r", resume=True)
    assert [r["loss"] for r in rest] == [r["loss"] for r in full_logs[4:]]
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), full.state_dict().values(),
                                                   strict=True))


def test_teacher_generations_are_made_once(tmp_path: Path, monkeypatch) -> None:
    teacher, _ = _pair()
    exs = _examples(3)
    f = tmp_path / "gen.jsonl"
    made = teacher_generations(teacher, exs, f, max_new_tokens=5, eos_id=0)
    assert [e.ids[: e.n_prompt] for e in made] == [e.ids[: e.n_prompt] for e in exs]
    with torch.no_grad():  # greedy: each stored token is the teacher's argmax after the previous ones
        seq = made[0].ids
        for t in range(made[0].n_prompt, len(seq)):
            assert int(teacher(input_ids=torch.tensor([seq[:t]])).logits[0, -1].argmax()) == seq[t]
    monkeypatch.setattr(teacher, "generate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("regenerated")))
    again = teacher_generations(teacher, exs, f, max_new_tokens=5, eos_id=0)
    assert [e.ids for e in again] == [e.ids for e in made]
    with pytest.raises(KdforgeError, match="another teacher, prompts or length"):
        teacher_generations(teacher, exs, f, max_new_tokens=6, eos_id=0)


def test_chunked_method_matches_full_logits() -> None:
    teacher, student = _pair()
    batch = pack(_examples(6), 48).rows(torch.arange(2))
    term = build_loss("lm_skl", alpha=0.1, chunk=7)
    got = LMDistill(student, teacher, [(term, 1.0)]).training_step(batch, 0)["loss"]
    with torch.no_grad():
        from kdforge.llm.metrics import lm_logits

        t = lm_logits(teacher, batch)
    s = lm_logits(student, batch)
    keep = batch["targets"] != -100
    lp, lq = F.log_softmax(t[keep], -1), F.log_softmax(s[keep], -1)
    log_m = torch.logaddexp(lp + torch.log(torch.tensor(0.1)), lq + torch.log(torch.tensor(0.9)))
    want = (lp.exp() * (lp - log_m)).sum(-1).mean()
    assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_live_forward_kl_step_equals_the_plain_full_logit_loss() -> None:
    """The live KD step (teacher and student logits made chunk by chunk from hidden states, the gradient fused)
    against KL(p ‖ q) of both models' full float32 logits in one autograd graph: values and gradients to 1e-6."""
    teacher, student = _pair()
    batch = pack(_examples(6), 48).rows(torch.arange(3))
    method = LMDistill(student, teacher, [(build_loss("lm_fkl", chunk=16), 1.0)])
    got = method.training_step(batch, 0)["loss"]
    g_got = torch.autograd.grad(got, list(student.parameters()))
    from kdforge.llm.metrics import lm_logits

    with torch.no_grad():
        t = lm_logits(teacher, batch)
    s = lm_logits(student, batch)
    keep = batch["targets"] != -100
    want = F.kl_div(F.log_softmax(s[keep], -1), F.log_softmax(t[keep], -1), log_target=True, reduction="batchmean")
    g_want = torch.autograd.grad(want, list(student.parameters()))
    assert int(keep.sum()) > 16  # several chunks
    assert abs(float(got) - float(want)) < 1e-6
    assert all(float((a - b).abs().max()) < 1e-6 for a, b in zip(g_got, g_want, strict=True))
