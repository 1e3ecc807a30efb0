"""Token streams: a corpus encoded once into one int32 array, cached on disk, cut into training windows.

Documents are encoded with the pinned tokenizer and joined with `<|endoftext|>` between them. The array is
cached as `.npy` under a key made of the corpus fingerprint and the tokenizer hash, so a changed corpus or
tokenizer never reuses stale ids, and peers can compare `TokenStream.fingerprint` before trusting each
other's batches.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from dragon_swarm.data.corpus import DEFAULT_HF_LIMIT_DOCS, Document, corpus_fingerprint, load_documents
from dragon_swarm.data.sharding import batch_offsets, sequential_offsets, split_train_validation
from dragon_swarm.data.tokenizer import EOT_ID, load_tokenizer, tokenizer_sha256
from dragon_swarm.state.atomic import atomic_write

logger = logging.getLogger(__name__)

_CACHE_FORMAT = "dragon_swarm.tokens.v1"  # bump when encode_documents changes its output


def stream_fingerprint(corpus_fp: str, tokenizer_sha: str) -> str:
    """Identity of an encoded stream: the same corpus bytes under the same tokenizer bytes."""
    return hashlib.sha256(f"{_CACHE_FORMAT}\0{corpus_fp}\0{tokenizer_sha}".encode("ascii")).hexdigest()


def encode_documents(docs: Sequence[Document], tokenizer: Tokenizer, eot_id: int = EOT_ID) -> np.ndarray:
    """Token ids of all documents, `eot_id` between consecutive ones, as one int32 array.

    A literal "<|endoftext|>" inside a document is encoded as plain text, so only the stream itself
    places document boundaries (scraped text that mentions the marker cannot forge one).
    """
    previous = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    try:
        # encode_batch spreads documents over all cores (rayon); 5 MB of Shakespeare takes about 2-5 s.
        encodings = tokenizer.encode_batch([doc.text for doc in docs], add_special_tokens=False)
    finally:
        tokenizer.encode_special_tokens = previous
    parts: list[np.ndarray] = []
    separator = np.array([eot_id], dtype=np.int32)
    for index, encoding in enumerate(encodings):
        if index:
            parts.append(separator)
        parts.append(np.asarray(encoding.ids, dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def _load_cached(path: Path) -> np.ndarray | None:
    try:
        tokens = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError) as e:
        logger.warning("token cache %s is unreadable (%s); encoding again", path, e)
        return None
    if tokens.ndim != 1 or tokens.dtype != np.int32:
        logger.warning("token cache %s holds %s %s, not 1-D int32; encoding again", path, tokens.shape, tokens.dtype)
        return None
    return tokens


def _save_atomically(path: Path, tokens: np.ndarray) -> None:
    # Peers sharing a cache dir (several processes on one host) must never read a half-written file.
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, tokens, allow_pickle=False)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; other users' peers may share the cache

    atomic_write(path, write)


class TokenStream:
    """One encoded corpus. Built with `from_documents` (which uses the cache) or from an array directly."""

    def __init__(self, tokens: np.ndarray, fingerprint: str):
        if tokens.ndim != 1 or tokens.dtype != np.int32:
            raise ValueError(f"tokens must be a 1-D int32 array, got {tokens.shape} {tokens.dtype}")
        if tokens.size < 2:
            raise ValueError(f"a token stream needs at least 2 tokens, got {tokens.size}")
        # A read-only view: batches are recomputed by other peers, so the stream must not drift in place.
        self._tokens = tokens.view()
        self._tokens.setflags(write=False)
        self._fingerprint = fingerprint

    @classmethod
    def from_documents(
        cls, docs: Sequence[Document], tokenizer: Tokenizer, tokenizer_sha: str, cache_dir: Path
    ) -> TokenStream:
        """Encode `docs`, or load their ids from `cache_dir` when this corpus/tokenizer pair was seen before."""
        fingerprint = stream_fingerprint(corpus_fingerprint(docs), tokenizer_sha)
        path = Path(cache_dir) / f"tokens-{fingerprint}.npy"
        tokens = _load_cached(path)
        if tokens is not None:
            logger.info("loaded %d tokens from %s", tokens.size, path)
            return cls(tokens, fingerprint)
        started = time.perf_counter()
        tokens = encode_documents(docs, tokenizer)
        elapsed = time.perf_counter() - started
        stream = cls(tokens, fingerprint)  # validates before anything reaches the cache
        _save_atomically(path, tokens)
        chars = sum(len(doc.text) for doc in docs)
        logger.info(
            "encoded %d documents (%.2f M chars) into %d tokens in %.2f s; cached at %s",
            len(docs), chars / 1e6, tokens.size, elapsed, path,
        )  # fmt: skip
        return stream

    @property
    def num_tokens(self) -> int:
        return int(self._tokens.size)

    @property
    def fingerprint(self) -> str:
        """sha256 naming corpus bytes + tokenizer bytes; equal streams hold equal ids."""
        return self._fingerprint

    @property
    def tokens(self) -> np.ndarray:
        """The ids, read-only."""
        return self._tokens

    def _windows(self, offsets: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = offsets[:, None] + np.arange(seq_len + 1, dtype=np.int64)[None, :]
        windows = torch.from_numpy(self._tokens[index].astype(np.int64))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def batch(
        self, swarm_seed: int, peer_id: str, step: int, batch_size: int, seq_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), both int64 [batch_size, seq_len], targets = inputs shifted left by one token.

        Windows come from `batch_offsets(swarm_seed, peer_id, step, ...)`, so another peer that knows
        these values can rebuild this exact batch.
        """
        offsets = batch_offsets(swarm_seed, peer_id, step, self.num_tokens, seq_len, batch_size)
        return self._windows(offsets, seq_len)

    def validation_batch(self, batch_index: int, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) from non-overlapping windows in stream order; the same on every peer.

        Meant for the held-out stream: evaluate batches 0..`sharding.num_sequential_batches(...)` - 1 to
        cover it once.
        """
        offsets = sequential_offsets(batch_index, self.num_tokens, seq_len, batch_size)
        return self._windows(offsets, seq_len)


def build_token_stream(
    source: str,
    data_dir: Path,
    cache_dir: Path,
    tokenizer_name: str,
    val_fraction: float,
    split_seed: int = 0,
    hf_limit_docs: int = DEFAULT_HF_LIMIT_DOCS,
) -> tuple[TokenStream, TokenStream]:
    """(train, validation) streams for a config's data section; documents are split, never cut.

    Validation takes whole documents until they hold `val_fraction` of the corpus's characters.

    `split_seed` must be the same on all peers (it is not the swarm seed, so changing the swarm's sampling
    seed does not move documents between train and validation).
    """
    docs = load_documents(source, Path(data_dir), hf_limit_docs=hf_limit_docs)
    train_idx, val_idx = split_train_validation(
        len(docs), val_fraction, split_seed, doc_sizes=[len(doc.text) for doc in docs]
    )
    tokenizer = load_tokenizer(tokenizer_name)
    sha = tokenizer_sha256(tokenizer_name)
    train = TokenStream.from_documents([docs[i] for i in train_idx], tokenizer, sha, cache_dir)
    val = TokenStream.from_documents([docs[i] for i in val_idx], tokenizer, sha, cache_dir)
    logger.info(
        "data %s: %d train documents (%d tokens), %d validation documents (%d tokens): %s",
        source, len(train_idx), train.num_tokens, len(val_idx), val.num_tokens,
        ", ".join(docs[i].name for i in val_idx[:5]),
    )  # fmt: skip
    return train, val
