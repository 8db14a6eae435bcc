"""Benchmark: Exp1 evaluation (§4.2) of every user's LoRA model, one user at a time vs mixed-user batches.

Exp1 generates, for every user, greedy replies (§4.3.2) from that user's own LoRA model on that user's test
contexts. Three ways to do it on one base model:

- one user at a time: the `PeftModel` runs with only that user's adapter active, and the user's contexts go
  through `greedy_generate` in one batch. Timed twice: "load per user" (`load_adapter` + `set_adapter`, the
  previous user's adapter deleted) and "switch per user" (all adapters loaded beforehand, `set_adapter`).
- peft's mixed batches (`lora_eval="peft"`, the reference): all users' adapters loaded once into the
  `PeftModel`, and every context goes through `greedy_generate(..., adapter_names=...)` in batches of
  `--batch-size` rows from different users; peft loops over the batch's adapters at every LoRA layer.
- routed batches (what `udg_lib.experiments` does by default): the same batches through a
  `generation.RoutedAdapters` on the plain base, each row through its own user's adapter in one pass per layer.

Everything is synthetic and made on the fly: a Unigram tokenizer built (not trained) from a pseudo-word
lexicon at the vocabulary size of the shape (`quick_tokenizer`: 32k rows for t5-base in well under a second,
where training a SentencePiece model of that size took most of the GPU check's time limit for the step), a
randomly initialised T5 of a `udg_lib.pretraining` preset shape, random non-zero adapters saved in PEFT's own
format with `udg_lib.finetuning.lora_config(FinetuneConfig())`, and PPP prompts (§3.4) of ~20-60 tokens.
The replies of every way must be identical to peft's mixed batches, context by context; the script prints OK
or the mismatches and exits 1 on any mismatch. Timings are printed, never asserted; with `--out` the JSON is
rewritten after every timed variant (`complete: false` until the end), so a run stopped at a time limit
still leaves the figures it had; on CUDA each variant's peak GPU memory is recorded beside its time.

    .venv/bin/python benchmarks/bench_mixed_adapters.py                      # cpu shape, 32 users x 8
    .venv/bin/python benchmarks/bench_mixed_adapters.py --shape t5-base --device cuda --out results.json
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch
from peft import PeftModel, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast, T5ForConditionalGeneration

from udg_lib import io
from udg_lib.data.schema import PROFILE_FIELDS
from udg_lib.finetuning import FinetuneConfig, lora_config
from udg_lib.generation import RoutedAdapters, greedy_generate, load_routed_adapters, load_user_adapters
from udg_lib.families import T5_PRESETS, Decoding, t5_config
from udg_lib.pretraining import build_model, count_parameters
from udg_lib.prompts import PROMPT_SPECIAL_TOKENS, build_ppp_prompt
from udg_lib.provenance import provenance

# Tokenizer size per shape: the "cpu" preset was sized with an 8k vocabulary, t5-base checkpoints carry 32k.
DEFAULT_VOCAB = {"test": 1000, "cpu": 8000, "t5-base": 32000}
LORA_INIT_STD = 0.2  # random LoRA A and B entries: large enough that every user's replies differ from the base
SYLLABLES = [c + v for c in "bdfghklmnprstvwz" for v in "aeiou"]  # 80 syllables for pseudo-words
PROFILE_VALUES = {  # synthetic profile values for the PPP prompts
    "age_band": ["10s", "20s", "30s", "40s", "50s", "60s"],
    "gender": ["female", "male"],
    "marital": ["single", "married"],
    "occupation": ["student", "engineer", "teacher", "nurse", "office worker", "designer", "farmer"],
    "region": ["tokyo", "osaka", "hokkaido", "kyushu", "london", "texas", "ontario"],
}
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------------------------
# Synthetic inputs


def pseudo_words(n: int, seed: int = 0) -> list[str]:
    """`n` distinct pronounceable words of 1-4 syllables (a lexicon rich enough for an 8k-32k vocabulary)."""
    rng = random.Random(seed)
    words: dict[str, None] = {}
    while len(words) < n:
        words["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4)))] = None
    return list(words)


def synthetic_sentences(n: int, lexicon: Sequence[str], seed: int = 0, min_words: int = 3,
                        max_words: int = 12) -> list[str]:
    """Sentences of Zipf-distributed words, as in natural text (few frequent words, a long tail)."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) for rank in range(len(lexicon))]
    return [" ".join(rng.choices(lexicon, weights, k=rng.randint(min_words, max_words))) for _ in range(n)]


def synthetic_prompts(n_users: int, n_contexts: int, lexicon: Sequence[str], seed: int = 0
                      ) -> tuple[list[str], list[str]]:
    """Each user's test prompts (PPP, §3.4: speaker and partner profile, then 1-2 context turns) and the
    adapter name of each prompt's user, user by user: `u0` x n_contexts, `u1` x n_contexts, ..."""
    rng = random.Random(seed)

    def profile() -> dict[str, str]:
        return {f: rng.choice(PROFILE_VALUES[f]) for f in PROFILE_FIELDS}

    turns = iter(synthetic_sentences(2 * n_users * n_contexts, lexicon, seed=seed, max_words=6))
    prompts, owners = [], []
    for user in range(n_users):
        speaker = profile()
        for _ in range(n_contexts):
            context = [next(turns) for _ in range(rng.randint(1, 2))]
            prompts.append(build_ppp_prompt(context, speaker, profile()))
            owners.append(adapter_name(user))
    return prompts, owners


def adapter_name(user: int) -> str:
    return f"u{user}"  # a valid module name, as peft requires


QUICK_SPECIALS = ("<pad>", "</s>", "<unk>")  # T5's ids 0, 1, 2 (families.t5_config's pad, eos, unk)
QUICK_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789.,:;!?'-+()/"


def quick_tokenizer(vocab_size: int, lexicon: Sequence[str]) -> PreTrainedTokenizerBase:
    """A SentencePiece-style Unigram tokenizer of `vocab_size` ids, built from `lexicon` without training.

    Ids: T5's pad 0, eos 1, unk 2; "▁" and one piece per character of QUICK_CHARACTERS (any word can be spelled);
    the words of the profile values (PPP prompts stay short); then the most frequent words of `lexicon` (it is
    ranked: `synthetic_sentences` draws word i with weight 1 / (i + 1)), scored by that Zipf frequency, up to
    `vocab_size`; the §3.4 markers last, as added special tokens. Every id decodes to text, so greedy replies of
    random weights are words that the equality check can compare.
    """
    profile_words = dict.fromkeys(w for values in PROFILE_VALUES.values() for v in values for w in v.split())
    fixed = [*QUICK_SPECIALS, "▁", *QUICK_CHARACTERS, *(f"▁{w}" for w in profile_words)]
    n_words = vocab_size - len(fixed) - len(PROMPT_SPECIAL_TOKENS)
    if n_words < 1:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for words beside {len(fixed)} fixed pieces")
    words = [f"▁{w}" for w in lexicon if w not in profile_words][:n_words]
    vocab = ([(piece, 0.0) for piece in QUICK_SPECIALS] + [(piece, -20.0) for piece in fixed[3:]]
             + [(word, -math.log(rank + 2)) for rank, word in enumerate(words)])
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(PROMPT_SPECIAL_TOKENS)})
    return tokenizer


def save_random_adapters(base: T5ForConditionalGeneration, n_users: int, folder: Path, seed: int = 0
                         ) -> dict[str, Path]:
    """`n_users` LoRA adapters (§4.1.3's configuration) with random non-zero A and B, saved in PEFT's format.

    A trained adapter's B is non-zero; peft initialises B to 0, which would leave every user's model equal
    to the base and make the equality check below vacuous. `base` is copied, never wrapped.
    """
    peft_model = get_peft_model(copy.deepcopy(base), lora_config(FinetuneConfig()))
    dirs = {}
    with torch.no_grad():
        for user in range(n_users):
            torch.manual_seed(seed * 100_003 + user)
            for name, parameter in peft_model.named_parameters():
                if "lora_" in name:
                    parameter.normal_(0.0, LORA_INIT_STD)
            dirs[adapter_name(user)] = folder / adapter_name(user)
            peft_model.save_pretrained(str(dirs[adapter_name(user)]))
    return dirs


# ---------------------------------------------------------------------------------------------------------------
# The ways to evaluate


def _by_user(owners: Sequence[str]) -> dict[str, list[int]]:
    rows: dict[str, list[int]] = {}
    for i, owner in enumerate(owners):
        rows.setdefault(owner, []).append(i)
    return rows


def generate_loading_each_user(base: T5ForConditionalGeneration, tokenizer: PreTrainedTokenizerBase,
                               adapter_dirs: Mapping[str, Path], sources: Sequence[str], owners: Sequence[str],
                               max_new_tokens: int) -> list[str]:
    """One user at a time: load the user's adapter onto the base, generate its contexts in one batch, drop it.

    `base` is wrapped in place (pass a copy you no longer need).
    """
    replies = [""] * len(sources)
    model: PeftModel | None = None
    previous = None
    for user, rows in _by_user(owners).items():
        if model is None:
            model = PeftModel.from_pretrained(base, str(adapter_dirs[user]), adapter_name=user)
        else:
            model.load_adapter(str(adapter_dirs[user]), adapter_name=user)
            model.set_adapter(user)
            model.delete_adapter(previous)  # keep one adapter in memory, as a loop over users would
        previous = user
        texts = greedy_generate(model, tokenizer, [sources[i] for i in rows],
                                Decoding(max_new_tokens=max_new_tokens, batch_size=len(rows)))
        for i, text in zip(rows, texts):
            replies[i] = text
    return replies


def generate_switching_users(model: PeftModel, tokenizer: PreTrainedTokenizerBase, sources: Sequence[str],
                             owners: Sequence[str], max_new_tokens: int) -> list[str]:
    """One user at a time on a `PeftModel` that holds every user's adapter: `set_adapter`, then one batch."""
    replies = [""] * len(sources)
    for user, rows in _by_user(owners).items():
        model.set_adapter(user)
        texts = greedy_generate(model, tokenizer, [sources[i] for i in rows],
                                Decoding(max_new_tokens=max_new_tokens, batch_size=len(rows)))
        for i, text in zip(rows, texts):
            replies[i] = text
    return replies


def generate_mixed(model: PeftModel, tokenizer: PreTrainedTokenizerBase, sources: Sequence[str],
                   owners: Sequence[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Many users per batch: each row runs through its own user's adapter (peft's `adapter_names`)."""
    return greedy_generate(model, tokenizer, sources, Decoding(max_new_tokens=max_new_tokens,
                                                               batch_size=batch_size), adapter_names=owners)


def generate_routed(routed: RoutedAdapters, tokenizer: PreTrainedTokenizerBase, sources: Sequence[str],
                    owners: Sequence[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Many users per batch, each row routed through its own user's adapter in one pass per layer."""
    return greedy_generate(routed, tokenizer, sources, Decoding(max_new_tokens=max_new_tokens,
                                                                batch_size=batch_size), adapter_names=owners)


@dataclass
class Mismatch:
    index: int
    user: str
    expected: str
    got: str


def find_mismatches(expected: Sequence[str], got: Sequence[str], owners: Sequence[str]) -> list[Mismatch]:
    """Contexts whose replies differ between two ways of generating them."""
    if not len(expected) == len(got) == len(owners):
        raise ValueError(f"{len(expected)} expected replies, {len(got)} replies, {len(owners)} owners")
    return [Mismatch(i, owners[i], a, b) for i, (a, b) in enumerate(zip(expected, got)) if a != b]


def timed(run: Callable[[], T], device: torch.device) -> tuple[T, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def peak_memory(device: torch.device) -> int | None:
    """Bytes of GPU memory allocated at most since the last `reset_peak_memory_stats` (None off CUDA)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


# ---------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shape", choices=tuple(T5_PRESETS), default="cpu", help="T5 preset (udg_lib.pretraining)")
    parser.add_argument("--vocab", type=int, default=None,
                        help=f"tokenizer vocabulary (upper bound); default per shape: {DEFAULT_VOCAB}")
    parser.add_argument("--users", type=int, default=32, help="users, one adapter each")
    parser.add_argument("--contexts", type=int, default=8, help="test contexts per user")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per mixed batch")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="greedy decoding length cap")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; None keeps torch's default")
    parser.add_argument("--repeats", type=int, default=1, help="timed rounds; each variant's fastest is kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    for name in ("users", "contexts", "batch_size", "max_new_tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.vocab is not None and args.vocab < 400:
        parser.error(f"--vocab must be at least 400 (256 byte pieces + markers + words), got {args.vocab}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print its table and return the figures (`identical` says whether the check passed)."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine")
    vocab = args.vocab or DEFAULT_VOCAB[args.shape]
    config = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "threads_used": torch.get_num_threads()}

    with tempfile.TemporaryDirectory(prefix="bench_mixed_adapters_") as tmp:
        start = time.perf_counter()
        lexicon = pseudo_words(max(2 * vocab, 200), args.seed)
        tokenizer = quick_tokenizer(vocab, lexicon)
        config["vocab_size"] = len(tokenizer)
        base = build_model(t5_config(args.shape, len(tokenizer)), tokenizer, seed=args.seed).eval()
        adapter_dirs = save_random_adapters(base, args.users, Path(tmp) / "adapters", args.seed)
        sources, owners = synthetic_prompts(args.users, args.contexts, lexicon, args.seed + 1)
        prompt_tokens = [len(ids) for ids in tokenizer(sources)["input_ids"]]
        setup_s = time.perf_counter() - start

        base = base.to(device)
        all_adapters, load_all_s = timed(lambda: load_user_adapters(copy.deepcopy(base), adapter_dirs), device)
        routed, load_routed_s = timed(lambda: load_routed_adapters(copy.deepcopy(base), adapter_dirs), device)
        # Warm-up (allocator, kernels, peft's adapter bookkeeping): the first user's contexts, each way.
        first = [i for i, owner in enumerate(owners) if owner == owners[0]]
        warm_sources, warm_owners = [sources[i] for i in first], [owners[i] for i in first]
        generate_loading_each_user(copy.deepcopy(base), tokenizer, adapter_dirs, warm_sources, warm_owners,
                                   args.max_new_tokens)
        generate_switching_users(all_adapters, tokenizer, warm_sources, warm_owners, args.max_new_tokens)
        generate_mixed(all_adapters, tokenizer, warm_sources, warm_owners, args.max_new_tokens, args.batch_size)
        generate_routed(routed, tokenizer, warm_sources, warm_owners, args.max_new_tokens, args.batch_size)

        replies: dict[str, list[str]] = {}
        seconds: dict[str, float] = {}
        peaks: dict[str, int | None] = {}
        model_info = {"shape": args.shape, "parameters": count_parameters(base)}

        def record(variant: str, run: Callable[[], list[str]]) -> None:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            replies[variant], took = timed(run, device)
            seconds[variant] = min(took, seconds.get(variant, float("inf")))
            peak = peak_memory(device)
            peaks[variant] = None if peak is None else max(peak, peaks.get(variant) or 0)
            if args.out is not None:  # the figures so far, in case the run is stopped before the end
                io.write_json(args.out, {"config": config, "model": model_info, "contexts": len(sources),
                                         "complete": False, "setup_seconds": setup_s, "seconds": seconds,
                                         "contexts_per_second": {k: len(sources) / v for k, v in seconds.items()},
                                         "peak_gpu_memory_bytes": max((p for p in peaks.values() if p), default=None),
                                         "peak_gpu_memory_bytes_by_variant": peaks})

        for _ in range(args.repeats):  # rounds interleave the variants, so a busy spell hits all of them
            fresh = copy.deepcopy(base)  # loading wraps the base in place; copied outside the timing
            record("(a) load per user", partial(generate_loading_each_user, fresh, tokenizer, adapter_dirs,
                                                sources, owners, args.max_new_tokens))
            record("(a) switch per user", partial(generate_switching_users, all_adapters, tokenizer, sources,
                                                  owners, args.max_new_tokens))
            record(f"(b) mixed, batch {args.batch_size}", partial(generate_mixed, all_adapters, tokenizer, sources,
                                                                  owners, args.max_new_tokens, args.batch_size))
            record(f"(c) routed, batch {args.batch_size}", partial(generate_routed, routed, tokenizer, sources,
                                                                   owners, args.max_new_tokens, args.batch_size))
            # A floor for (b): the same batches through the base model alone. Its replies also show that the
            # adapters matter, without which identical replies would prove nothing.
            with all_adapters.disable_adapter():
                record("base model, no adapters", partial(greedy_generate, all_adapters, tokenizer, sources,
                                                          Decoding(args.max_new_tokens, args.batch_size)))

        routed.close()

    loaded, switched, mixed, routed_replies, base_replies = replies.values()
    load_s, switch_s, mixed_s, routed_s, _ = seconds.values()
    mismatches = {"load per user": find_mismatches(loaded, mixed, owners),
                  "switch per user": find_mismatches(switched, mixed, owners),
                  "routed": find_mismatches(routed_replies, mixed, owners)}
    n = len(sources)
    reply_tokens = [len(ids) for ids in tokenizer(mixed, add_special_tokens=False)["input_ids"]]
    report: dict[str, Any] = {
        "config": config,
        "model": {**model_info, "lora_parameters_per_user": sum(p.numel() for n_, p in all_adapters.named_parameters()
                                                                if "lora_" in n_ and f".{owners[0]}." in n_)},
        "contexts": n,
        "complete": True,
        "prompt_tokens": {"mean": sum(prompt_tokens) / n, "min": min(prompt_tokens), "max": max(prompt_tokens)},
        "reply_tokens_mean": sum(reply_tokens) / n,
        "replies_differing_from_base": sum(a != b for a, b in zip(mixed, base_replies)),
        "setup_seconds": setup_s,
        "load_all_adapters_seconds": load_all_s,
        "load_routed_adapters_seconds": load_routed_s,
        "seconds": seconds,
        "contexts_per_second": {k: n / s for k, s in seconds.items()},
        "speedup_mixed_over": {"load per user": load_s / mixed_s, "switch per user": switch_s / mixed_s},
        "speedup_routed_over": {"load per user": load_s / routed_s, "switch per user": switch_s / routed_s,
                                "mixed": mixed_s / routed_s},
        "mismatches": {k: [vars(m) for m in v] for k, v in mismatches.items()},
        "identical": not any(mismatches.values()),
        "peak_gpu_memory_bytes": max((p for p in peaks.values() if p), default=None),
        "peak_gpu_memory_bytes_by_variant": peaks,
        "provenance": provenance({"seed": args.seed}),
    }
    print_report(report)
    if args.out is not None:
        io.write_json(args.out, report)
        print(f"wrote {args.out}")
    return report


def print_report(report: Mapping[str, Any]) -> None:
    config, model = report["config"], report["model"]
    print(f"T5 {model['shape']} ({model['parameters'] / 1e6:.2f}M parameters, vocab {config['vocab_size']}), "
          f"LoRA {model['lora_parameters_per_user'] / 1e3:.1f}k parameters per user; {config['users']} users x "
          f"{config['contexts']} contexts = {report['contexts']}; prompts {report['prompt_tokens']['mean']:.0f} "
          f"tokens (min {report['prompt_tokens']['min']}, max {report['prompt_tokens']['max']}); greedy, "
          f"max_new_tokens {config['max_new_tokens']} (replies average {report['reply_tokens_mean']:.1f} tokens); "
          f"device {config['device']}, {config['threads_used']} threads")
    print(f"setup {report['setup_seconds']:.1f} s; loading all {config['users']} adapters once "
          f"{report['load_all_adapters_seconds']:.2f} s into peft, {report['load_routed_adapters_seconds']:.2f} s "
          "routed (not in the switch/mixed/routed times)")
    if report["peak_gpu_memory_bytes"] is not None:
        print("peak GPU memory: " + ", ".join(f"{v} {b / 2**30:.2f} GiB" for v, b in
                                              report["peak_gpu_memory_bytes_by_variant"].items()))
    print(f"{'variant':<26}{'seconds':>9}{'contexts/s':>12}{'(b) speedup':>13}{'(c) speedup':>13}")
    mixed_s = next(s for v, s in report["seconds"].items() if v.startswith("(b)"))
    routed_s = next(s for v, s in report["seconds"].items() if v.startswith("(c)"))
    for variant, seconds in report["seconds"].items():
        print(f"{variant:<26}{seconds:>9.2f}{report['contexts_per_second'][variant]:>12.1f}"
              f"{seconds / mixed_s:>12.2f}x{seconds / routed_s:>12.2f}x")
    print("(b)/(c) speedup = variant's seconds / (b)'s or (c)'s seconds; the base model shows the cost of the same "
          "batches with no LoRA at all")
    print(f"replies changed by the adapters (vs the base model): {report['replies_differing_from_base']}"
          f"/{report['contexts']}")
    for variant, mismatches in report["mismatches"].items():
        if not mismatches:
            print(f"OK: {variant} and mixed batches give identical replies for all {report['contexts']} contexts")
            continue
        print(f"MISMATCH: {variant} vs mixed batches differ on {len(mismatches)}/{report['contexts']} contexts")
        for m in mismatches[:10]:
            print(f"  context {m['index']} ({m['user']}): {variant} {m['expected']!r} / mixed {m['got']!r}")


if __name__ == "__main__":
    sys.exit(0 if main()["identical"] else 1)
