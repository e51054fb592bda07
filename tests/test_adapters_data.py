"""token_windows / special_token_mask on real tokenizers (MiniLM, and one built with `tokenizers`)."""
from __future__ import annotations

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers
import torch
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from opt_hooks.adapters.data import bos_token_id, special_token_mask, token_windows

CLS, SEP, PAD = 101, 102, 0  # MiniLM's [CLS] (its sequence start), [SEP], [PAD]


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def all_windows(*args, **kwargs) -> torch.Tensor:
    return torch.cat(list(token_windows(*args, **kwargs)))


def word_level_tokenizer() -> tokenizers.Tokenizer:
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate("a b c d e f".split())}}
    tokenizer = tokenizers.Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    return tokenizer


def test_windows_are_built_the_sae_lens_way(minilm_tokenizer):
    docs = ["hello world", "the dog barks loudly"]
    a, b = ids(minilm_tokenizer, docs[0]), ids(minilm_tokenizer, docs[1])
    assert len(a) == 2 and len(b) >= 3
    windows = all_windows(docs, minilm_tokenizer, 4, n_tokens=8)
    # BOS opens every window; BOS also separates documents inside a window
    assert windows.tolist() == [[CLS, *a, CLS], [CLS, *b[:3]]]
    assert windows.dtype == torch.long

    no_bos = all_windows(docs, minilm_tokenizer, 3, n_tokens=6, prepend_bos=False)
    assert no_bos.tolist() == [[*a, b[0]], b[1:4]]  # no separator without a BOS token


def test_n_tokens_and_batch_size(minilm_tokenizer):
    docs = ["a b c d e f g h i j k l m n o p"] * 20
    batches = list(token_windows(docs, minilm_tokenizer, 8, n_tokens=75, batch_size=4))
    assert [tuple(b.shape) for b in batches] == [(4, 8), (4, 8), (2, 8)]  # ceil(75 / 8) = 10 windows


def test_running_out_warns_with_the_count_and_nothing_at_all_is_an_error(minilm_tokenizer):
    with pytest.warns(UserWarning, match=r"auditing 16 tokens \(2 windows of 8\), fewer than the 800"):
        windows = all_windows(["a b c d e f g h i j k l m n"], minilm_tokenizer, 8, n_tokens=800)
    assert windows.shape == (2, 8)
    for empty in ([], ["", ""]):
        with pytest.raises(ValueError, match="dataset yielded 0 tokens"):
            all_windows(empty, minilm_tokenizer, 8, n_tokens=10)
    with pytest.raises(ValueError, match="yielded 3 tokens, fewer than one window of context_size=8"):
        all_windows(["a b c"], minilm_tokenizer, 8, n_tokens=10)
    with pytest.raises(ValueError, match="n_tokens must be positive"):
        token_windows(["a"], minilm_tokenizer, 8, n_tokens=0)


def test_local_files(tmp_path, minilm_tokenizer):
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\nsecond\n")
    text = all_windows(tmp_path / "a.txt", minilm_tokenizer, 7, n_tokens=7)
    first, second = ids(minilm_tokenizer, "first paragraph\nstill first"), ids(minilm_tokenizer, "second")
    assert text.tolist() == [[CLS, *first, CLS, *second]]  # one document per paragraph

    rows = [{"text": "one two three", "id": 1}, {"text": "four five six", "id": 2}]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    jsonl = all_windows(str(tmp_path / "rows.jsonl"), minilm_tokenizer, 8, n_tokens=8)
    one, two = ids(minilm_tokenizer, "one two three"), ids(minilm_tokenizer, "four five six")
    assert jsonl.tolist() == [[CLS, *one, CLS, *two]]

    folder = tmp_path / "parquet"
    folder.mkdir()
    for i in range(2):  # the only string column is picked
        pq.write_table(pa.table({"body": [f"part {i} alpha beta gamma"], "n": [i]}), folder / f"{i}.parquet")
    words = [t for i in range(2) for t in ids(minilm_tokenizer, f"part {i} alpha beta gamma")]
    parquet = all_windows(folder, minilm_tokenizer, 4, n_tokens=12)
    assert parquet.shape == (3, 4) and (parquet[:, 0] == CLS).all()  # every window opens with BOS
    assert parquet[parquet != CLS].tolist() == words[: int((parquet != CLS).sum())]

    (folder / "extra.txt").write_text("mixed")
    with pytest.raises(ValueError, match="mixes"):
        token_windows(folder, minilm_tokenizer, 4, n_tokens=4)
    with pytest.raises(FileNotFoundError):
        token_windows(tmp_path / "missing.jsonl", minilm_tokenizer, 4, n_tokens=4)


def test_text_column_is_picked_or_the_columns_are_listed(minilm_tokenizer):
    two_strings = datasets.Dataset.from_dict({"title": ["x y z w"], "body": ["a b c d e"], "n": [1]})
    with pytest.raises(ValueError, match=r"columns are title \(string\), body \(string\), n \(int\).*text_column="):
        token_windows(two_strings, minilm_tokenizer, 4, n_tokens=4)
    body = all_windows(two_strings, minilm_tokenizer, 4, n_tokens=4, text_column="body")
    assert body.tolist() == [[CLS, *ids(minilm_tokenizer, "a b c")]]
    with pytest.raises(ValueError, match="'nope' is not in the dataset"):
        token_windows(two_strings, minilm_tokenizer, 4, n_tokens=4, text_column="nope")

    with_text = datasets.Dataset.from_dict({"text": ["a b c d e"], "title": ["z"]})
    splits = datasets.DatasetDict({"validation": with_text})
    streamed = all_windows(splits, minilm_tokenizer, 4, n_tokens=4, split="validation")
    assert torch.equal(streamed, all_windows(with_text.to_iterable_dataset(), minilm_tokenizer, 4, n_tokens=4))
    with pytest.raises(ValueError, match="split 'train' not in the dataset; it has validation"):
        token_windows(splits, minilm_tokenizer, 4, n_tokens=4)


def test_pretokenised_inputs_need_no_tokenizer():
    rows = torch.arange(30).reshape(3, 10)
    assert torch.equal(all_windows(rows, None, 8, n_tokens=16), rows[:2, :8])  # rows cut, as SAE-Lens does
    stream = torch.arange(20)
    assert torch.equal(all_windows(stream, None, 8, n_tokens=16), stream[:16].view(2, 8))
    column = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7, 8, 9], [1, 2, 3, 4, 5]]})
    assert all_windows(column, None, 4, n_tokens=8).tolist() == [[5, 6, 7, 8], [1, 2, 3, 4]]
    with pytest.raises(ValueError, match="fewer than context_size=12"):
        all_windows(rows, None, 12, n_tokens=12)


def test_a_hub_name_that_cannot_be_reached_fails_cleanly(minilm_tokenizer):
    with pytest.raises(ValueError, match=r"could not load the Hugging Face dataset 'NeelNanda/pile-10k'.*local file"):
        token_windows("NeelNanda/pile-10k", minilm_tokenizer, 8, n_tokens=8)


def test_tokenizers_library_tokenizer_and_bos_fallback():
    raw = word_level_tokenizer()
    assert all_windows(["a b c", "d e f"], raw, 3, n_tokens=6, prepend_bos=False).tolist() == [[2, 3, 4], [5, 6, 7]]
    with pytest.raises(ValueError, match="no BOS token"):
        all_windows(["a b"], raw, 2, n_tokens=2)
    # a GPT-2-like tokenizer adds nothing itself: its bos_token is the sequence start
    gpt2_like = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    assert bos_token_id(gpt2_like) == 0
    assert all_windows(["a b", "c"], gpt2_like, 5, n_tokens=5).tolist() == [[0, 2, 3, 0, 4]]


def test_tokenizer_can_come_from_the_model(tiny_bridge, minilm_tokenizer):
    docs = ["some words here", "and more words there"]
    from_model = all_windows(docs, tiny_bridge, 4, n_tokens=8)
    assert torch.equal(from_model, all_windows(docs, minilm_tokenizer, 4, n_tokens=8))


def test_special_token_mask(minilm_tokenizer, tiny_bridge):
    tokens = torch.tensor([[CLS, 2023, SEP, PAD, 7592]])
    expected = torch.tensor([[True, False, True, True, False]])
    assert torch.equal(special_token_mask(tokens, minilm_tokenizer), expected)
    assert torch.equal(special_token_mask(tokens, tiny_bridge), expected)
    windows = all_windows(["one two three four five"], minilm_tokenizer, 4, n_tokens=4)
    assert special_token_mask(windows, minilm_tokenizer).tolist() == [[True, False, False, False]]
