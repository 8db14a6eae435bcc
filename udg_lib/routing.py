"""Per-row LoRA routing: forward hooks that send each batch row through its own user's adapter.

Both halves of batched multi-user LoRA stand on this module: training (`multilora.MultiLora` hooks the same
targets with trainable, per-user A/B matrices) and evaluation (`RoutedAdapters` below, which
`generation.greedy_generate` / `reference_nll` take in place of a model). It sits below both, so generation
needs nothing of training's machinery: the peft matching of target modules (`lora_target_names`), the names
peft gives saved LoRA weights, the hook plumbing (`_TargetHooks`), and reading a saved PEFT adapter.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from safetensors.torch import load_file
from torch import nn

ADAPTER_CONFIG_FILE = "adapter_config.json"  # peft.utils.CONFIG_NAME
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"  # peft.utils.SAFETENSORS_WEIGHTS_NAME
PEFT_KEY_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the base model, in saved key names


def lora_target_names(model: nn.Module, peft_config: LoraConfig) -> list[str]:
    """Names of the modules peft would put LoRA on, in `named_modules` order (peft's matching, not a copy)."""
    names = []
    for name, module in model.named_modules():
        if not name or not check_target_module_exists(peft_config, name):  # an excluded module is falsy too
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"LoRA target {name!r} is a {type(module).__name__}; batched LoRA supports nn.Linear only")
        names.append(name)
    if not names:
        raise ValueError(f"no module of {type(model).__name__} matches target_modules={peft_config.target_modules!r}")
    return names


def _peft_key(module_name: str, matrix: str) -> str:
    return f"{PEFT_KEY_PREFIX}{module_name}.{matrix}.weight"


class _TargetHooks:
    """Forward hooks on a base model's LoRA target modules; `close()` (or leaving a `with` block) removes them
    and `_reset()` drops the subclass' per-batch state."""

    _handles: list

    def _hook(self, name: str) -> Callable:
        raise NotImplementedError

    def _reset(self) -> None:
        raise NotImplementedError

    def _hook_targets(self, base_model: nn.Module, targets: Sequence[str]) -> None:
        self._handles = [base_model.get_submodule(name).register_forward_hook(self._hook(name)) for name in targets]

    def __enter__(self) -> _TargetHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._reset()


BASE_ROUTE = "__base__"  # a row routed to no adapter (peft's own name for it in mixed batches)


class RoutedAdapters(_TargetHooks):
    """Many users' saved LoRA adapters on one plain base model, each batch row through its own user's adapter.

    Evaluation's counterpart of `MultiLora`: peft's mixed batches (`adapter_names=`) loop in Python over the
    adapters present in a batch at every LoRA layer, so with 32 users a batch costs about as much as 32
    one-user batches. Here each target module's adapters are stacked once at load time (A^T as users x in x r,
    B^T as users x r x out, a zero slot for `BASE_ROUTE`), each row's pair is gathered once per batch (`route`)
    and applied with two `bmm`s: one pass per layer whatever the number of users. The arithmetic per row is
    peft's, `output + (B(A(x)) * scaling).to(output.dtype)` with x cast to the adapter dtype (float32, as peft
    keeps adapters of a half-precision base), so replies match peft's token for token up to matmul rounding.

    Works for any model whose LoRA targets are `nn.Linear` (T5's q/k/v/o, Llama's q_proj/.../o_proj): the
    targets are read from the saved keys, not from a config. Adapters are PEFT's format (adapter_config.json +
    adapter_model.safetensors, as `PeftModel.save_pretrained` and `run_users` write them); scaling is
    lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA), per user, and ranks may differ (zero-padded to the
    largest, which adds exact zeros). DoRA, LoRA biases, fan_in_fan_out, rank/alpha patterns and
    modules_to_save are refused. Dropout does not apply: routing is for eval mode only.

    Routing follows batch rows: set it around each batch (`with routed.route(names): model.generate(...)`).
    `generate` keeps the batch's rows through the encoder and every cached decoder step (greedy and sampling
    never reorder rows); a module seeing k times the routed rows (beam search expands row i into rows
    i*k .. i*k+k-1 with `repeat_interleave`, and beams stay within their row) routes each block of k rows to
    the row's user. Use as a context manager: on exit the hooks are removed and the base model is unchanged.
    Memory: the stacked adapters, plus per routed batch one gathered A/B pair per target (rows x in x r).
    """

    def __init__(self, base_model: nn.Module, adapter_dirs: Mapping[str, str | Path]):
        if not adapter_dirs:
            raise ValueError("no adapters to load")
        if BASE_ROUTE in adapter_dirs:
            raise ValueError(f"{BASE_ROUTE!r} names the base model, not an adapter")
        self.model = base_model
        self.names = list(adapter_dirs)
        loaded = {name: _read_peft_adapter(Path(folder)) for name, folder in adapter_dirs.items()}
        order = {name: k for k, (name, _) in enumerate(base_model.named_modules())}
        targets = {t for _, weights in loaded.values() for t in weights}
        absent = sorted(targets - set(order))
        if absent:
            raise ValueError(f"{type(base_model).__name__} has no modules {absent[:3]} that the adapters target")
        self.targets = sorted(targets, key=order.__getitem__)
        for name in self.targets:
            module = base_model.get_submodule(name)
            if not isinstance(module, nn.Linear):
                raise ValueError(f"LoRA target {name!r} is a {type(module).__name__}; routed LoRA supports nn.Linear only")
        self.slot = {BASE_ROUTE: 0, **{name: k + 1 for k, name in enumerate(self.names)}}  # slot 0: no adapter
        self.scaling = torch.tensor([0.0] + [loaded[n][0] for n in self.names], dtype=torch.float32)
        rank = max(a.shape[0] for _, weights in loaded.values() for a, _ in weights.values())
        self._stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for target in self.targets:
            module = base_model.get_submodule(target)
            stack_a = torch.zeros(len(self.slot), module.in_features, rank, dtype=torch.float32)
            stack_b = torch.zeros(len(self.slot), rank, module.out_features, dtype=torch.float32)
            for name in self.names:
                folder = adapter_dirs[name]
                pair = loaded[name][1].get(target)
                if pair is None:
                    continue  # this user has no adapter on this module: zeros
                lora_a, lora_b = pair
                if lora_a.shape[1] != module.in_features or lora_b.shape[0] != module.out_features:
                    raise ValueError(f"{Path(folder) / ADAPTER_WEIGHTS_FILE}: {target} has A {tuple(lora_a.shape)}, "
                                     f"B {tuple(lora_b.shape)}; the module is {module.in_features} -> "
                                     f"{module.out_features}")
                stack_a[self.slot[name], :, : lora_a.shape[0]] = lora_a.t()
                stack_b[self.slot[name], : lora_b.shape[1], :] = lora_b.t()
            device = module.weight.device
            self._stacks[target] = (stack_a.to(device), stack_b.to(device))
        self._device = base_model.get_submodule(self.targets[0]).weight.device
        self.scaling = self.scaling.to(self._device)
        self._index: torch.Tensor | None = None
        self._gathered: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._hook_targets(base_model, self.targets)

    def _reset(self) -> None:
        self._index, self._gathered = None, {}

    @contextmanager
    def route(self, row_names: Sequence[str]) -> Iterator[None]:
        """Within the block, row i of every batch goes through adapter `row_names[i]` (`BASE_ROUTE`: none)."""
        if not self._handles:
            raise RuntimeError("RoutedAdapters is closed")
        unknown = sorted(set(row_names) - set(self.slot))
        if unknown:
            raise KeyError(f"no adapter named {unknown[:5]}")
        previous = self._index, self._gathered
        self._index = torch.tensor([self.slot[n] for n in row_names], dtype=torch.long, device=self._device)
        self._gathered = {}
        try:
            yield
        finally:
            self._index, self._gathered = previous

    def _rows(self, name: str, n_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The routed rows' A^T, B^T and scaling for target `name`, gathered once per batch (and row multiple)."""
        routed = self._index.shape[0]
        if n_rows % routed:
            raise ValueError(f"{name}: a batch of {n_rows} rows, but {routed} rows were routed")
        key = (name, n_rows // routed)
        if key not in self._gathered:
            stack_a, stack_b = self._stacks[name]
            index = self._index.repeat_interleave(n_rows // routed).to(stack_a.device)
            self._gathered[key] = (stack_a.index_select(0, index), stack_b.index_select(0, index),
                                   self.scaling.to(stack_a.device).index_select(0, index).view(-1, 1, 1))
        return self._gathered[key]

    def _hook(self, name: str) -> Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor | None]:
        def add_lora(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if self._index is None:
                return None  # outside `route`: the plain base model
            if module.training:
                raise RuntimeError(f"{name}: RoutedAdapters is for evaluation; call model.eval() first")
            x = args[0]
            rows_a, rows_b, scaling = self._rows(name, x.shape[0])
            h = x.reshape(x.shape[0], -1, x.shape[-1]).to(rows_a.dtype)
            delta = torch.bmm(torch.bmm(h, rows_a), rows_b) * scaling  # peft: lora_B(lora_A(x)) * scaling
            return output + delta.reshape(output.shape).to(output.dtype)

        return add_lora


def _read_peft_adapter(folder: Path) -> tuple[float, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """A saved PEFT LoRA adapter: its scaling and, per target module name, (A as r x in, B as out x r)."""
    config_path, weights_path = folder / ADAPTER_CONFIG_FILE, folder / ADAPTER_WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (a PEFT adapter folder holds {ADAPTER_CONFIG_FILE} and "
                                    f"{ADAPTER_WEIGHTS_FILE})")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    unsupported = {"peft_type": config.get("peft_type", "LORA") != "LORA", "use_dora": bool(config.get("use_dora")),
                   "bias": config.get("bias", "none") != "none", "lora_bias": bool(config.get("lora_bias")),
                   "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
                   "rank_pattern": bool(config.get("rank_pattern")), "alpha_pattern": bool(config.get("alpha_pattern")),
                   "modules_to_save": bool(config.get("modules_to_save"))}
    refused = [key for key, bad in unsupported.items() if bad]
    if refused:
        raise ValueError(f"{config_path}: routed LoRA does not support {', '.join(f'{k}={config.get(k)!r}' for k in refused)}")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r  # peft's LoraLayer.update_layer
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(weights_path)).items():
        for matrix in ("lora_A", "lora_B"):
            suffix = f".{matrix}.weight"
            if key.startswith(PEFT_KEY_PREFIX) and key.endswith(suffix):
                weights.setdefault(key[len(PEFT_KEY_PREFIX): -len(suffix)], {})[matrix] = value.float()
                break
        else:
            raise ValueError(f"{weights_path}: unexpected key {key!r} (routed LoRA reads LoRA A/B weights only)")
    pairs = {}
    for target, matrices in weights.items():
        if set(matrices) != {"lora_A", "lora_B"} or matrices["lora_A"].shape[0] != matrices["lora_B"].shape[1]:
            raise ValueError(f"{weights_path}: {target} has {sorted(matrices)} of shapes "
                             f"{[tuple(m.shape) for m in matrices.values()]}, not a LoRA A/B pair")
        pairs[target] = (matrices["lora_A"], matrices["lora_B"])
    if not pairs:
        raise ValueError(f"{weights_path}: no LoRA weights")
    return scaling, pairs
