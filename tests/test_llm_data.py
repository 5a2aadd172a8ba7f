"""kdforge.llm text: JSONL rows, chat templates, packing (attention and loss stay inside a document), metrics."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from kdforge.errors import KdforgeError
from kdforge.llm import ByteTokenizer, tiny_llama
from kdforge.llm.loading import load_causal_lm, save_causal_lm
from kdforge.llm.metrics import greedy_agreement, lm_logits, lm_loss, perplexity
from kdforge.llm.surgery import prune_decoder_layers
from kdforge.llm.text import (
    IGNORE,
    Example,
    pack,
    read_jsonl,
    split_examples,
    text_examples,
    tokenize_example,
)


def _docs() -> list[Example]:
    tok = ByteTokenizer()
    rows = [{"prompt": "2+2=", "response": "4"}, {"prompt": "Name a colour: ", "response": "blue"},
            {"text": "plain words all trained"}, {"prompt": "Q? ", "response": "yes, surely"}]
    return [tokenize_example(tok, r, "plain") for r in rows]


def test_pack_targets_by_hand() -> None:
    a = Example([1, 2, 3], [False, True, True])
    b = Example([4, 5], [False, True])
    p = pack([a, b], seq_len=7, pad_id=9)
    assert p.ids.tolist() == [[1, 2, 3, 4, 5, 9, 9]]
    assert p.positions.tolist() == [[0, 1, 2, 0, 1, 0, 0]]
    assert p.doc.tolist() == [[0, 0, 0, 1, 1, -1, -1]]
    # position t predicts token t+1 of its own document when that token is a response token
    assert p.targets.tolist() == [[2, 3, IGNORE, 5, IGNORE, IGNORE, IGNORE]]
    # first fit: a document that does not fit opens a row, a later short one fills the gap
    q = pack([Example([1] * 5, [True] * 5), Example([2] * 4, [True] * 4), Example([3] * 2, [True] * 2)], 7)
    assert q.doc.tolist() == [[0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, -1, -1, -1]]
    with pytest.raises(KdforgeError, match="seq_len 3"):
        pack([Example([1] * 5, [True] * 5)], 3, truncate=False)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_logits_equal_documents_alone(impl: str) -> None:
    model = tiny_llama(3)
    model.set_attn_implementation(impl)
    docs = _docs()
    p = pack(docs, seq_len=48)
    assert len(p) < len(docs)  # several documents share a row
    batch = p.rows(torch.arange(len(p)))
    with torch.no_grad():
        packed = lm_logits(model, batch)
        for r in range(len(p)):
            for d in range(int(p.doc[r].max()) + 1):
                cols = (p.doc[r] == d).nonzero().flatten()
                alone = lm_logits(model, p.ids[r, cols].unsqueeze(0))[0]
                assert torch.allclose(packed[r, cols], alone, atol=1e-5), (impl, r, d)


def test_packed_loss_is_the_mean_over_response_tokens() -> None:
    model = tiny_llama(2)
    docs = _docs()
    p = pack(docs, seq_len=48)
    with torch.no_grad():
        got = float(lm_loss(model, p.rows(torch.arange(len(p)))))
        nll, n = 0.0, 0
        for ex in docs:  # each document alone, loss on its trained tokens only
            logits = lm_logits(model, torch.tensor([ex.ids]))[0, :-1]
            tgt = torch.tensor(ex.ids[1:])
            keep = torch.tensor(ex.trained[1:])
            nll += float(F.cross_entropy(logits[keep], tgt[keep], reduction="sum"))
            n += int(keep.sum())
    assert got == pytest.approx(nll / n, rel=1e-5)
    assert perplexity(model, p, batch_size=1) == pytest.approx(torch.tensor(nll / n).exp().item(), rel=1e-5)


def _chat_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    t.train_from_iterator(["user assistant hello there general kenobi"] * 10, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|im_end|>", unk_token="<unk>")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def test_chat_template_masks_the_prompt(tmp_path) -> None:
    tok = _chat_tokenizer()
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hello there"},
                                          {"role": "assistant", "content": "general kenobi"}]}) + "\n\n"
                 + json.dumps({"prompt": "hello", "completion": "there"}) + "\n")
    rows = read_jsonl(f)
    ex = tokenize_example(tok, rows[0])  # auto: the tokenizer has a chat template
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello there"}], tokenize=False,
                                     add_generation_prompt=True)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert ex.n_prompt == n_prompt and all(ex.trained[n_prompt:])
    assert tok.decode(ex.ids[n_prompt:]) == "general kenobi<|im_end|>\n"
    plain = tokenize_example(tok, rows[1], "plain")
    assert tok.decode(plain.ids[plain.n_prompt:]) == "there<|im_end|>"  # plain rows end with eos
    with pytest.raises(KdforgeError, match="chat template"):
        tokenize_example(ByteTokenizer(), rows[0], "chat")


def test_jsonl_errors_name_the_line(tmp_path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(KdforgeError, match="line 2: 'prompt' without"):
        read_jsonl(f)
    f.write_text('{"prompt": "a", "response": "b"}\nnot json\n')
    with pytest.raises(KdforgeError, match="line 2: not valid JSON"):
        read_jsonl(f)
    with pytest.raises(KdforgeError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_split_by_document() -> None:
    ex = text_examples(ByteTokenizer(), "\n\n".join(f"document number {i}" for i in range(20)))
    tr, ev = split_examples(ex, 0.2, seed=3)
    assert len(ev) == 4 and len(tr) == 16
    assert {bytes(e.ids) for e in tr}.isdisjoint({bytes(e.ids) for e in ev})
    assert tr + ev != ex and sorted(map(bytes, (e.ids for e in tr + ev))) == sorted(bytes(e.ids) for e in ex)


def test_qwen2_layer_types_follow_the_kept_layers() -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    m = Qwen2ForCausalLM(cfg).eval()
    types = list(m.config.layer_types)
    p = prune_decoder_layers(m, [1, 2])
    assert p.config.layer_types == [types[1], types[2]] == ["full_attention", "sliding_attention"]
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(1))
    out = p.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    ref = p.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(out, ref)


def test_greedy_agreement_against_a_manual_decode() -> None:
    teacher = tiny_llama(4, seed=1)
    student = prune_decoder_layers(teacher, [0, 3])
    prompts = torch.randint(1, 256, (3, 5), generator=torch.Generator().manual_seed(2))
    got = greedy_agreement(student, teacher, prompts, new_tokens=6)
    hits = 0
    with torch.no_grad():
        for row in prompts:
            seq = row.tolist()
            for _ in range(6):  # teacher greedy, token by token without a KV cache
                nxt = int(teacher(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
                hits += int(student(input_ids=torch.tensor([seq])).logits[0, -1].argmax()) == nxt
                seq.append(nxt)
    assert got == pytest.approx(hits / 18)


def test_load_tiny_and_hf_folder(tmp_path) -> None:
    model, tok = load_causal_lm("tiny:3")
    assert len(model.model.layers) == 3 and isinstance(tok, ByteTokenizer)
    save_causal_lm(prune_decoder_layers(model, [0, 2]), tok, tmp_path / "m")
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert back.config.num_hidden_layers == 2
    with pytest.raises(KdforgeError, match="does not exist"):
        load_causal_lm(str(tmp_path / "nope.gguf"))


def _fake_tool(bindir, name: str, body: str) -> None:
    f = bindir / name
    f.write_text("#!/bin/sh\n" + body + "\n")
    f.chmod(0o755)


def test_austen_corpus_is_fetched_with_apt_and_dpkg_when_absent(tmp_path, monkeypatch) -> None:
    """No unpacked corpus: `apt-get download` in a scratch folder, `dpkg-deb -x` into place (fake tools, no network)."""
    from kdforge.llm.text import fetch_austen

    bindir = tmp_path / "bin"
    bindir.mkdir()
    _fake_tool(bindir, "apt-get", '[ "$1 $2" = "download r-cran-janeaustenr" ] || exit 9\n'
                                  'echo deb > r-cran-janeaustenr_1.0.0-1_all.deb')
    _fake_tool(bindir, "dpkg-deb", '[ "$1" = -x ] || exit 9\nd="$3/usr/lib/R/site-library/janeaustenr/data"\n'
                                   '/bin/mkdir -p "$d" && /bin/cp "$2" "$d/Rdata.rdb" && /bin/touch "$d/Rdata.rdx"')
    monkeypatch.setenv("PATH", str(bindir))
    base = tmp_path / "cache" / "janeaustenr"
    assert fetch_austen(base) == base
    db = base / "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
    assert db.read_text() == "deb\n"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["janeaustenr"]  # the scratch folder is gone


def test_austen_corpus_fetch_failures_are_one_line(tmp_path, monkeypatch) -> None:
    from kdforge.llm.text import austen_text

    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", str(bindir))
    with pytest.raises(KdforgeError, match=r"apt-get, dpkg-deb is not available.*apt-get download r-cran-janeaustenr"):
        austen_text(root=tmp_path / "austen")
    _fake_tool(bindir, "apt-get", "echo 'E: Unable to locate package r-cran-janeaustenr' >&2; exit 100")
    _fake_tool(bindir, "dpkg-deb", "exit 0")
    with pytest.raises(KdforgeError, match=r"'apt-get download r-cran-janeaustenr' failed \(E: Unable to locate "
                                           r"package r-cran-janeaustenr; run 'apt-get update' first\?\)") as e:
        austen_text(root=tmp_path / "austen")
    assert "\n" not in str(e.value) and not (tmp_path / "austen").exists()


def test_a_jsonl_text_source_reads_every_row_form_as_plain_text(tmp_path) -> None:
    """compress and prune read `text.calib/heal/eval` through read_text: a .jsonl file is its rows as plain text."""
    from kdforge.llm.text import read_text

    f = tmp_path / "mine.jsonl"
    f.write_text(json.dumps({"prompt": "Q1", "response": "A1"}) + "\n"
                 + json.dumps({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q2"},
                                            {"role": "assistant", "content": "A2"}]}) + "\n"
                 + json.dumps({"text": "plain words"}) + "\n" + json.dumps({"prompt": "Q3", "completion": "A3"}))
    assert read_text(str(f)) == "Q1\nA1\n\nS\nQ2\nA2\n\nplain words\n\nQ3\nA3"
    t = tmp_path / "mine.txt"
    t.write_text('{"prompt": "kept as written"}')
    assert read_text(str(t)) == '{"prompt": "kept as written"}'  # only .jsonl files are parsed
    with pytest.raises(KdforgeError, match="line 1: 'prompt' without"):
        read_text(str(t.rename(tmp_path / "bad.jsonl")))
