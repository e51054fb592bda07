"""Text datasets -> fixed-size windows of token ids, the way SAE-Lens builds its training batches.

Documents are tokenised without special tokens and concatenated by sae_lens'
`concat_and_batch_sequences`: every window starts with the BOS token (when prepend_bos) and
documents are separated by BOS, SAE-Lens' default `sequence_separator_token`. The last,
incomplete window is dropped.

Accepted datasets:

- a Hugging Face dataset name (`datasets.load_dataset(name, split=split, streaming=streaming)`);
- a local file or a directory of files of one kind: .txt (one document per paragraph, i.e.
  documents separated by blank lines, as datasets' text builder with sample_by="paragraph"
  reads them), .jsonl, .parquet;
- a `datasets.Dataset` / `IterableDataset` (or a dict of splits);
- a list of strings (one document each);
- already tokenised ids: a 2-D tensor of rows (each row is cut to context_size, as SAE-Lens
  does with pre-tokenised datasets, no BOS added) or a 1-D token stream (cut into windows).

For row datasets the text column is "text", else the only string column; a dataset with no
string column but a "tokens" / "input_ids" column of ids is treated as pre-tokenised.

"BOS" is the token the tokenizer puts first itself when it adds special tokens (BERT's [CLS],
Llama's <s>), else its bos_token_id (GPT-2's <|endoftext|>): TransformerLens gives BERT-like
tokenizers a placeholder bos_token that is not a real sequence start.
"""
from __future__ import annotations

import itertools
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import torch
from sae_lens.tokenization_and_batching import concat_and_batch_sequences
from sae_lens.util import get_special_token_ids
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".parquet": "parquet"}
TOKEN_COLUMNS = ("tokens", "input_ids")
_DOCS_PER_TOKENIZER_CALL = 64


def token_windows(
    dataset: Any,
    tokenizer_or_model: Any,
    context_size: int,
    *,
    n_tokens: int,
    batch_size: int = 16,
    text_column: str | None = None,
    prepend_bos: bool = True,
    split: str = "train",
    streaming: bool = True,
) -> Iterator[torch.Tensor]:
    """Batches (<= batch_size, context_size) of token-id windows, ceil(n_tokens / context_size)
    windows in all. Loading errors are raised here; running out of data is reported while
    iterating: an error if no window could be made, else a warning with the tokens delivered.
    `tokenizer_or_model` may be None for already tokenised data."""
    for name, value in (("context_size", context_size), ("n_tokens", n_tokens), ("batch_size", batch_size)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    source = _open(dataset, split, streaming)
    tokens_read = _Counter()
    if isinstance(source, torch.Tensor):
        windows = _tensor_windows(source, context_size, tokens_read)
    else:
        documents = _documents(source, text_column)
        windows = _windows(documents, tokenizer_or_model, context_size, prepend_bos, tokens_read)
    return _batches(windows, math.ceil(n_tokens / context_size), batch_size, context_size, tokens_read)


def special_token_mask(tokens: torch.Tensor, tokenizer_or_model: Any) -> torch.Tensor:
    """Bool mask, True at BOS / CLS / EOS / PAD / SEP / decoder-start positions."""
    tokenizer = as_tokenizer(tokenizer_or_model)
    ids = set(get_special_token_ids(tokenizer))
    ids.update(i for i in (tokenizer.cls_token_id, bos_token_id(tokenizer)) if i is not None)
    return torch.isin(tokens, torch.tensor(sorted(ids), dtype=tokens.dtype, device=tokens.device))


def as_tokenizer(tokenizer_or_model: Any) -> PreTrainedTokenizerBase:
    """A Hugging Face tokenizer from a tokenizer, a `tokenizers.Tokenizer`, or a model carrying one."""
    import tokenizers

    found = tokenizer_or_model
    if not isinstance(found, (PreTrainedTokenizerBase, tokenizers.Tokenizer)):
        found = getattr(found, "tokenizer", None)  # HookedTransformer, TransformerBridge
    if isinstance(found, tokenizers.Tokenizer):
        return PreTrainedTokenizerFast(tokenizer_object=found)
    if isinstance(found, PreTrainedTokenizerBase):
        return found
    raise ValueError(
        f"no tokenizer in {type(tokenizer_or_model).__name__}: pass a Hugging Face tokenizer, "
        "a model that has one, or already tokenised ids"
    )


def bos_token_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The sequence-start token (see the module docstring)."""
    with_special = tokenizer("x")["input_ids"]
    without = tokenizer("x", add_special_tokens=False)["input_ids"]
    if len(with_special) > len(without) and with_special[0] != without[0]:
        return with_special[0]
    return tokenizer.bos_token_id


def _open(dataset: Any, split: str, streaming: bool) -> Any:
    """A tensor of ids, a list of strings, or a (streaming) datasets dataset of rows."""
    if isinstance(dataset, torch.Tensor):
        return dataset
    if isinstance(dataset, (str, os.PathLike)):
        path = Path(dataset).expanduser()
        if path.exists():
            return _load_local(path, streaming)
        if looks_like_a_path(dataset):
            raise FileNotFoundError(f"no such file or directory: {dataset}")
        try:
            return datasets.load_dataset(str(dataset), split=split, streaming=streaming)
        except Exception as error:  # the hub, the network and the builders raise many kinds
            raise ValueError(
                f"could not load the Hugging Face dataset {dataset!r} (split {split!r}): {error}. "
                "Offline? Pass a local file, a datasets.Dataset or a list of strings instead"
            ) from error
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in dataset:
            raise ValueError(f"split {split!r} not in the dataset; it has {', '.join(dataset)}")
        return dataset[split]
    if isinstance(dataset, (datasets.Dataset, datasets.IterableDataset, list, tuple)):
        return dataset
    raise TypeError(
        f"unsupported dataset type {type(dataset).__name__}: pass a Hugging Face dataset name, a "
        "local file or directory, a datasets.Dataset, a list of strings or a tensor of token ids"
    )


def looks_like_a_path(dataset: str | os.PathLike) -> bool:
    """A path object, or a name that is one (a .txt/.jsonl/.parquet suffix, or starting with . / ~),
    not a Hugging Face dataset name."""
    text = str(dataset)
    return isinstance(dataset, os.PathLike) or Path(text).suffix in LOCAL_BUILDERS or text.startswith((".", "/", "~"))


def _load_local(path: Path, streaming: bool) -> Any:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    kinds = {p.suffix for p in files if p.suffix in LOCAL_BUILDERS}
    if not kinds:
        raise ValueError(f"no {'/'.join(LOCAL_BUILDERS)} files in {path}")
    if len(kinds) > 1:
        raise ValueError(f"{path} mixes {', '.join(sorted(kinds))} files; point at files of one kind")
    (suffix,) = kinds
    options = {"sample_by": "paragraph"} if suffix == ".txt" else {}
    return datasets.load_dataset(
        LOCAL_BUILDERS[suffix],
        data_files=[str(p) for p in files if p.suffix == suffix],
        split="train",
        streaming=streaming,
        **options,
    )


def _documents(source: Any, text_column: str | None) -> Iterator[str | list[int]]:
    """Documents: strings to tokenise, or lists of ids from a pre-tokenised column."""
    if isinstance(source, (list, tuple)):
        for i, doc in enumerate(source):
            if not isinstance(doc, str):
                raise TypeError(f"a list dataset must hold strings; item {i} is {type(doc).__name__}")
        return iter(source)
    rows = iter(source)
    first = next(rows, None)
    if first is None:
        return iter(())
    column = _pick_column(first, getattr(source, "features", None), text_column)
    return (row[column] for row in itertools.chain([first], rows) if row[column] is not None)


def _pick_column(first_row: dict[str, Any], features: Any, text_column: str | None) -> str:
    """The text column: from the dataset's features when known, else from the first row."""
    if features:
        strings = [c for c, f in features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    else:
        strings = [c for c, v in first_row.items() if isinstance(v, str)]
    described = ", ".join(f"{c} ({'string' if c in strings else type(v).__name__})" for c, v in first_row.items())
    if text_column is not None:
        if text_column not in first_row:
            raise ValueError(f"text_column {text_column!r} is not in the dataset; its columns: {described}")
        return text_column
    if "text" in strings:
        return "text"
    if len(strings) == 1:
        return strings[0]
    pretokenised = [c for c in TOKEN_COLUMNS if c in first_row]
    if not strings and pretokenised:
        return pretokenised[0]
    raise ValueError(
        f"cannot pick the text column: the dataset's columns are {described}; "
        "pass text_column='<name of the column holding the text>'"
    )


def _windows(
    documents: Iterator[str | list[int]],
    tokenizer_or_model: Any,
    context_size: int,
    prepend_bos: bool,
    tokens_read: _Counter,
) -> Iterator[torch.Tensor]:
    first = next(documents, None)
    if first is None:
        return iter(())
    documents = itertools.chain([first], documents)
    if not isinstance(first, str):  # a pre-tokenised column: rows cut to context_size, as SAE-Lens does
        rows = (torch.as_tensor(ids, dtype=torch.long) for ids in documents)
        return _cut_rows(tokens_read.count(rows), context_size)
    tokenizer = as_tokenizer(tokenizer_or_model)
    bos = bos_token_id(tokenizer) if prepend_bos else None
    if prepend_bos and bos is None:
        raise ValueError("the tokenizer has no BOS token; pass prepend_bos=False")
    return concat_and_batch_sequences(
        tokens_iterator=tokens_read.count(_tokenise(documents, tokenizer)),
        context_size=context_size,
        begin_batch_token_id=bos,
        sequence_separator_token_id=bos,
    )


def _tokenise(documents: Iterator[str], tokenizer: PreTrainedTokenizerBase) -> Iterator[torch.Tensor]:
    """1-D LongTensors of ids, no special tokens; empty documents are skipped."""
    while chunk := list(itertools.islice(documents, _DOCS_PER_TOKENIZER_CALL)):
        # verbose=False: documents longer than the model's context are expected here
        for ids in tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]:
            if ids:
                yield torch.tensor(ids, dtype=torch.long)


def _tensor_windows(ids: torch.Tensor, context_size: int, tokens_read: _Counter) -> Iterator[torch.Tensor]:
    if ids.ndim not in (1, 2) or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"token ids must be a 1-D or 2-D integer tensor, got {ids.dtype} {tuple(ids.shape)}")
    ids = ids.long()
    if ids.ndim == 1:  # one token stream, cut into consecutive windows
        n_windows = len(ids) // context_size
        tokens_read.n += len(ids)
        return iter(ids[: n_windows * context_size].view(n_windows, context_size))
    return _cut_rows(tokens_read.count(iter(ids)), context_size)


def _cut_rows(rows: Iterator[torch.Tensor], context_size: int) -> Iterator[torch.Tensor]:
    for row in rows:
        if len(row) < context_size:
            raise ValueError(f"a pre-tokenised row has {len(row)} tokens, fewer than context_size={context_size}")
        yield row[:context_size]


def _batches(
    windows: Iterator[torch.Tensor], n_windows: int, batch_size: int, context_size: int, tokens_read: _Counter
) -> Iterator[torch.Tensor]:
    delivered = 0
    windows = itertools.islice(windows, n_windows)
    while batch := list(itertools.islice(windows, batch_size)):
        delivered += len(batch)
        yield torch.stack(batch)
    if delivered == 0:
        if tokens_read.n == 0:
            raise ValueError("dataset yielded 0 tokens")
        raise ValueError(
            f"dataset yielded {tokens_read.n} tokens, fewer than one window of context_size={context_size}"
        )
    if delivered < n_windows:
        warnings.warn(
            f"the dataset ran out: auditing {delivered * context_size} tokens "
            f"({delivered} windows of {context_size}), fewer than the {n_windows * context_size} asked for",
            UserWarning,
            stacklevel=2,
        )


class _Counter:
    """Counts the token ids flowing through an iterator of 1-D tensors."""

    def __init__(self) -> None:
        self.n = 0

    def count(self, rows: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        for row in rows:
            self.n += len(row)
            yield row
