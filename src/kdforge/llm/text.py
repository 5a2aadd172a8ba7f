"""Text for language models: corpora, JSONL prompt/response rows, chat templates, packing with masks, splits."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdforge.errors import KdforgeError


def pydoc_text() -> str:
    """Python's documentation topics (about 465k characters of English prose; ships with CPython)."""
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


AUSTEN_HELP = ("cd ~/.cache/kdforge && apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb "
               "janeaustenr && pip install rdata")
AUSTEN_DEB = "r-cran-janeaustenr"
_AUSTEN_DB = "usr/lib/R/site-library/janeaustenr/data/Rdata"


def austen_dir(root: str | Path | None = None) -> Path:
    """Where Debian's ``r-cran-janeaustenr`` is unpacked: ``root``, ``$KDFORGE_AUSTEN`` or
    ``~/.cache/kdforge/janeaustenr``."""
    import os

    return Path(root or os.environ.get("KDFORGE_AUSTEN") or Path.home() / ".cache/kdforge/janeaustenr")


def fetch_austen(base: Path) -> Path:
    """Download Debian's ``r-cran-janeaustenr`` (``apt-get download``) and unpack it into ``base`` (``dpkg-deb -x``).

    Needs apt (any user: nothing is installed) and the package lists (``apt-get update``); refused in one
    line naming what failed and the manual steps otherwise. The unpacked tree appears in ``base`` only
    when complete.
    """
    import shutil
    import subprocess
    import tempfile

    missing = [t for t in ("apt-get", "dpkg-deb") if shutil.which(t) is None]
    if missing:
        raise KdforgeError(f"Jane Austen's novels are not unpacked in {str(base)!r} and {', '.join(missing)} "
                           f"is not available to fetch them; get them by hand: {AUSTEN_HELP}")
    base.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=base.parent, prefix=".janeaustenr-") as tmp:
        r = subprocess.run(["apt-get", "download", AUSTEN_DEB], cwd=tmp, capture_output=True, text=True, check=False)
        debs = sorted(Path(tmp).glob(f"{AUSTEN_DEB}_*.deb"))
        if r.returncode != 0 or not debs:
            why = (r.stderr.strip().splitlines() or ["no .deb written"])[-1]
            raise KdforgeError(f"Jane Austen's novels are not unpacked in {str(base)!r} and 'apt-get download "
                               f"{AUSTEN_DEB}' failed ({why}; run 'apt-get update' first?); get them by hand: "
                               f"{AUSTEN_HELP}")
        unpacked = Path(tmp) / "tree"
        r = subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(unpacked)], capture_output=True, text=True,
                           check=False)
        if r.returncode != 0 or not (unpacked / _AUSTEN_DB).with_suffix(".rdb").is_file():
            why = (r.stderr.strip().splitlines() or ["no Rdata.rdb in the package"])[-1]
            raise KdforgeError(f"unpacking {debs[-1].name} with dpkg-deb failed ({why}); get the novels by hand: "
                               f"{AUSTEN_HELP}")
        if base.exists():
            shutil.rmtree(base)
        unpacked.rename(base)
    return base


#: the novels of Debian's r-cran-janeaustenr; the benches hold out Persuasion and train or heal on the other five
AUSTEN_BOOKS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
AUSTEN_OTHER_NOVELS = tuple(b for b in AUSTEN_BOOKS if b != "persuasion")


def austen_text(books: Sequence[str] = ("persuasion",), root: str | Path | None = None) -> str:
    """Jane Austen's novels (public domain) from Debian's ``r-cran-janeaustenr`` package, read without R.

    ``root``: where the .deb is unpacked (:func:`austen_dir`); when absent there, it is downloaded and unpacked
    by :func:`fetch_austen`. Reading needs ``rdata`` (``pip install 'kdforge[bench]'``).
    Books: emma, mansfieldpark, northangerabbey, persuasion, prideprejudice, sensesensibility.
    """
    import warnings
    import zlib

    base = austen_dir(root)
    db = base / _AUSTEN_DB
    if not db.with_suffix(".rdb").is_file():
        fetch_austen(base)
    try:
        import rdata
    except ImportError:
        raise KdforgeError("reading the Austen corpus needs rdata: pip install rdata (or pip install "
                           "'kdforge[bench]')") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = rdata.conversion.convert(rdata.parser.parse_file(db.with_suffix(".rdx")))
        blob = db.with_suffix(".rdb").read_bytes()
        out = []
        for name in books:
            if name not in index["variables"]:
                raise KdforgeError(f"unknown Austen book {name!r} (valid: {', '.join(sorted(index['variables']))})")
            off, n = index["variables"][name]
            raw = zlib.decompress(blob[int(off) + 4: int(off) + int(n)])
            lines = rdata.conversion.convert(rdata.parser.parse_data(raw))
            out.append("\n".join(str(x) for x in lines if x))
    return "\n\n".join(out)


def read_text(source: str) -> str:
    """Text by name: ``pydoc``, ``austen`` or ``austen:<book>,<book>``, or a path to a text or ``.jsonl`` file.

    A JSONL file's rows (:func:`read_jsonl`) become plain text: each row's turns and answer on their own lines,
    rows separated by a blank line (no chat template: the text is cut into rows of tokens, not trained as turns).
    """
    if source == "pydoc":
        return pydoc_text()
    if source == "austen" or source.startswith("austen:"):
        books = source.partition(":")[2]
        return austen_text(tuple(books.split(",")) if books else ("persuasion",))
    p = Path(source)
    if not p.is_file():
        raise KdforgeError(f"text source {source!r} is neither 'pydoc', 'austen[:book,...]' nor a readable file")
    if p.suffix == ".jsonl":
        docs = []
        for row in read_jsonl(p):
            if "messages" in row:
                parts = [str(m.get("content", "")) for m in row["messages"]]
            else:
                turns, answer = prompt_response(row)
                parts = [*(t["content"] for t in turns), answer]
            docs.append("\n".join(parts))
        return "\n\n".join(docs)
    return p.read_text(encoding="utf-8", errors="replace")


def token_blocks(tokenizer: Any, text: str, seq_len: int, max_tokens: int | None = None) -> Tensor:
    """The text's token ids cut into non-overlapping rows of ``seq_len`` tokens: (n, seq_len)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0] \
        if callable(tokenizer) else torch.as_tensor(tokenizer.encode(text))
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = len(ids) // seq_len
    if n == 0:
        raise KdforgeError(f"text too short: {len(ids)} tokens for sequences of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len).long()


def spread_rows(blocks: Tensor, n: int) -> Tensor:
    """At most ``n`` rows spread evenly from first to last (so several books in one text all take part)."""
    if len(blocks) <= n:
        return blocks
    return blocks[torch.linspace(0, len(blocks) - 1, n).round().long()]


def split_blocks(blocks: Tensor, eval_fraction: float = 0.2) -> tuple[Tensor, Tensor]:
    """(calibration/heal rows, held-out evaluation rows): the evaluation rows are the text's last part."""
    n_eval = max(1, round(len(blocks) * eval_fraction))
    if n_eval >= len(blocks):
        raise KdforgeError(f"need at least 2 sequences to split calibration from evaluation, got {len(blocks)}")
    return blocks[:-n_eval], blocks[-n_eval:]


# -- prompt/response examples ----------------------------------------------------------------
@dataclass
class Example:
    """One tokenized document: its ids and which of them are trained on (False for prompt tokens)."""

    ids: list[int]
    trained: list[bool]

    @property
    def n_prompt(self) -> int:
        """Number of leading untrained (prompt) tokens."""
        return next((i for i, t in enumerate(self.trained) if t), len(self.trained))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file: ``{"prompt", "response"}`` (or ``completion``), ``{"messages": [...]}`` or ``{"text"}``."""
    p = Path(path)
    if not p.is_file():
        raise KdforgeError(f"JSONL file {str(path)!r} does not exist")
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise KdforgeError(f"{p.name} line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not ({"prompt", "messages", "text"} & row.keys()):
            raise KdforgeError(f"{p.name} line {n}: expected an object with 'prompt' and 'response' (or "
                               "'completion'), 'messages' (chat turns) or 'text'")
        if "prompt" in row and not ({"response", "completion"} & row.keys()):
            raise KdforgeError(f"{p.name} line {n}: 'prompt' without 'response' or 'completion'")
        rows.append(row)
    if not rows:
        raise KdforgeError(f"JSONL file {str(path)!r} holds no rows")
    return rows


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) and hasattr(tokenizer, "apply_chat_template")


def _chat_text(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def prompt_response(row: dict[str, Any]) -> tuple[list[dict[str, str]], str]:
    """(chat turns before the answer, the answer) of a JSONL row."""
    if "messages" in row:
        msgs = list(row["messages"])
        if not msgs or msgs[-1].get("role") != "assistant":
            raise KdforgeError("a 'messages' row must end with an assistant turn (the response that is trained on)")
        return msgs[:-1], str(msgs[-1]["content"])
    if "text" in row:
        return [], str(row["text"])
    return [{"role": "user", "content": str(row["prompt"])}], str(row.get("response", row.get("completion")))


def prompt_text(tokenizer: Any, turns: list[dict[str, str]], template: str = "auto") -> str:
    """The text the model sees before its answer: the chat template's prompt, or the plain turns' contents."""
    if not turns:
        return ""
    chat = _use_chat(tokenizer, template)
    return _chat_text(tokenizer, turns, True) if chat else "\n".join(t["content"] for t in turns) + "\n"


def _use_chat(tokenizer: Any, template: str) -> bool:
    if template not in ("auto", "chat", "plain"):
        raise KdforgeError(f"template must be 'auto', 'chat' or 'plain', got {template!r}")
    if template == "chat" and not _has_chat_template(tokenizer):
        raise KdforgeError("template 'chat' needs a tokenizer with a chat template; use 'plain'")
    return template == "chat" or (template == "auto" and _has_chat_template(tokenizer))


def tokenize_example(tokenizer: Any, row: dict[str, Any], template: str = "auto", eos: bool = True) -> Example:
    """A JSONL row as ids with prompt tokens untrained; chat rows go through the tokenizer's chat template."""
    from kdforge.llm.loading import encode

    turns, answer = prompt_response(row)
    prompt = prompt_text(tokenizer, turns, template)
    p_ids = encode(tokenizer, prompt) if prompt else []
    if prompt and _use_chat(tokenizer, template):
        full = encode(tokenizer, _chat_text(tokenizer, [*turns, {"role": "assistant", "content": answer}], False))
        # the answer's ids are what the chat template adds after the generation prompt
        r_ids = full[len(p_ids):] if full[: len(p_ids)] == p_ids else encode(tokenizer, answer)
    else:
        r_ids = encode(tokenizer, answer)
        eos_id = getattr(tokenizer, "eos_token_id", None)
        if eos and eos_id is not None:
            r_ids = [*r_ids, int(eos_id)]
    return Example(p_ids + r_ids, [False] * len(p_ids) + [True] * len(r_ids))


def text_examples(tokenizer: Any, text: str, doc_sep: str = "\n\n") -> list[Example]:
    """Plain text as documents (split at ``doc_sep``), every token trained on."""
    from kdforge.llm.loading import encode

    docs = [d for d in text.split(doc_sep) if d.strip()] if doc_sep else [text]
    return [Example(ids, [True] * len(ids)) for ids in (encode(tokenizer, d) for d in docs) if ids]


def split_examples(examples: Sequence[Example], eval_fraction: float = 0.1, seed: int = 0
                   ) -> tuple[list[Example], list[Example]]:
    """(train, validation) documents: a seeded split by whole documents, so none is in both."""
    if not 0 < eval_fraction < 1:
        raise KdforgeError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    n_eval = max(1, round(len(examples) * eval_fraction))
    if n_eval >= len(examples):
        raise KdforgeError(f"need at least 2 documents to split off a validation set, got {len(examples)}")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    ev = set(order[:n_eval])
    return ([e for i, e in enumerate(examples) if i not in ev], [e for i, e in enumerate(examples) if i in ev])


# -- packing ---------------------------------------------------------------------------------
@dataclass
class Packed:
    """Documents packed into rows of ``seq_len`` tokens.

    ``doc`` numbers the documents of a row (-1 for padding); ``positions`` restart at 0 with each
    document; ``targets[b, t]`` is the token predicted at position t (the next one), -100 where no loss
    is taken: the next token is a prompt token, padding, or in another document.
    """

    ids: Tensor
    positions: Tensor
    doc: Tensor
    targets: Tensor

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def loss_mask(self) -> Tensor:
        """Positions whose next-token prediction is trained on."""
        return self.targets != IGNORE

    def rows(self, idx: Tensor) -> dict[str, Tensor]:
        """A batch of rows as a dict (ids, positions, doc, targets, rows)."""
        idx = idx.long()
        return {"ids": self.ids[idx], "positions": self.positions[idx], "doc": self.doc[idx],
                "targets": self.targets[idx], "rows": idx}


IGNORE = -100


def pack(examples: Sequence[Example], seq_len: int, pad_id: int = 0, truncate: bool = True,
         one_per_row: bool = False) -> Packed:
    """Pack documents first-fit in order into rows of ``seq_len`` (or one a row); longer ones are cut (or refused)."""
    if seq_len < 2:
        raise KdforgeError(f"seq_len must be at least 2, got {seq_len}")
    rows: list[list[tuple[int, Example]]] = []
    free: list[int] = []
    for n, ex in enumerate(examples):
        if len(ex.ids) > seq_len:
            if not truncate:
                raise KdforgeError(f"document {n} has {len(ex.ids)} tokens, more than seq_len {seq_len}")
            ex = Example(ex.ids[:seq_len], ex.trained[:seq_len])
        if len(ex.ids) < 2 and not one_per_row:
            continue
        slot = None if one_per_row else next((i for i, f in enumerate(free) if f >= len(ex.ids)), None)
        if slot is None:
            rows.append([])
            free.append(seq_len)
            slot = len(rows) - 1
        rows[slot].append((n, ex))
        free[slot] -= len(ex.ids)
    if not rows:
        raise KdforgeError("no document with at least 2 tokens to pack")
    shape = (len(rows), seq_len)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    pos = torch.zeros(shape, dtype=torch.long)
    doc = torch.full(shape, -1, dtype=torch.long)
    tgt = torch.full(shape, IGNORE, dtype=torch.long)
    for r, row in enumerate(rows):
        t = 0
        for d, (_, ex) in enumerate(row):
            n = len(ex.ids)
            ids[r, t: t + n] = torch.tensor(ex.ids)
            pos[r, t: t + n] = torch.arange(n)
            doc[r, t: t + n] = d
            nxt = torch.tensor(ex.ids[1:])
            trained = torch.tensor(ex.trained[1:])
            tgt[r, t: t + n - 1] = torch.where(trained, nxt, IGNORE)
            t += n
    return Packed(ids, pos, doc, tgt)


def block_causal_mask(doc: Tensor, dtype: torch.dtype = torch.float32, boolean: bool = True) -> Tensor:
    """(B, 1, L, L) attention mask: causal and within one document; padding sees only itself.

    ``boolean``: True where attention is allowed (SDPA); otherwise an additive float mask (0 / dtype min).
    """
    L = doc.shape[-1]
    causal = torch.ones(L, L, dtype=torch.bool, device=doc.device).tril()
    same = doc.unsqueeze(-1) == doc.unsqueeze(-2)
    allowed = causal & same & (doc.unsqueeze(-1) >= 0)
    allowed = allowed | torch.eye(L, dtype=torch.bool, device=doc.device)  # no empty rows (NaN softmax)
    allowed = allowed.unsqueeze(1)
    if boolean:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=doc.device).masked_fill(~allowed, torch.finfo(dtype).min)
