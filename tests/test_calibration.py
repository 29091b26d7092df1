"""Calibration rows: packed documents, no padding, deterministic, hashed; the bundled corpus is intact."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
from transformers import AutoTokenizer

from converters.quantize.calibration import DEFAULT_CORPUS, build_calibration
from factory import build_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_tokenizer(d)
    return AutoTokenizer.from_pretrained(d)


def stream(tok, files) -> list[int]:
    """The whole packed token stream, in order (one row as long as the stream)."""
    n = build_calibration(tok, files, nsamples=10**9, seqlen=1).rows.shape[0]
    return build_calibration(tok, files, nsamples=1, seqlen=n).rows[0].tolist()


@pytest.fixture
def files(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("The river ran past the mill and under the old stone bridge. <s> stays text. " * 40)
    jl = tmp_path / "b.jsonl"
    jl.write_text("\n".join([json.dumps({"text": f"Document {i}: the baker opened his shop at noon."}) for i in range(30)]
                            + [json.dumps({"messages": [{"role": "user", "content": "hello"},
                                                        {"role": "assistant", "content": "good morning"}]})] * 5))
    return [txt, jl]


def test_rows_are_full_packed_and_deterministic(tok, files):
    a = build_calibration(tok, files, nsamples=6, seqlen=32, seed=1)
    b = build_calibration(tok, files, nsamples=6, seqlen=32, seed=1)
    c = build_calibration(tok, files, nsamples=6, seqlen=32, seed=2)
    assert a.rows.shape == (6, 32) and a.rows.dtype == torch.int64
    assert torch.equal(a.rows, b.rows) and a.meta == b.meta
    assert not torch.equal(a.rows, c.rows) and a.meta["tokens_sha256"] != c.meta["tokens_sha256"]
    assert a.meta["tokens_sha256"] == hashlib.sha256(a.rows.to(torch.int32).numpy().tobytes()).hexdigest()
    assert a.meta["documents"] == 1 + 35 and a.meta["files"][0]["name"] == "a.txt"
    assert (a.rows != tok.pad_token_id).all()  # packed: padding never appears
    # documents are separated by BOS/EOS ids, and a literal "<s>" in the text is not the BOS id
    ids = stream(tok, files[:1])
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id


def test_chat_messages_use_the_template(tok, tmp_path):
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hello there"}]}) + "\n")
    assert "user: hello there\n" in tok.decode(stream(tok, [f]))


def test_too_little_data_and_bad_input(tok, tmp_path, caplog):
    f = tmp_path / "short.txt"
    f.write_text("only a few words here")
    with pytest.raises(ValueError, match="fewer than one row"):
        build_calibration(tok, [f], nsamples=4, seqlen=512)
    rows = build_calibration(tok, [f], nsamples=100, seqlen=2).rows
    assert rows.shape[0] < 100 and "using all of them" in caplog.text
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"other": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        build_calibration(tok, [bad])
    with pytest.raises(ValueError, match="must be .txt or .jsonl"):
        build_calibration(tok, [tmp_path / "x.csv"])


def test_default_corpus_is_used_and_matches_its_documented_hashes(tok):
    cal = build_calibration(tok, None, nsamples=4, seqlen=64)
    assert cal.meta["default_corpus"] and cal.rows.shape == (4, 64)
    readme = (DEFAULT_CORPUS / "README.md").read_text()
    documented = dict(re.findall(r"`([\w.]+\.txt)`[^`]*`([0-9a-f]{64})`", readme))
    files = sorted(p.name for p in DEFAULT_CORPUS.glob("*.txt"))
    assert sorted(documented) == files
    for name in files:
        assert hashlib.sha256((DEFAULT_CORPUS / name).read_bytes()).hexdigest() == documented[name], name
