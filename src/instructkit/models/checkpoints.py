"""The one place that knows checkpoint formats and their parameter names.

Here: HF GPT-2 (`GPT2LMHeadModel`, Conv1D weights stored (in, out)), the book's chapter
`GPTModel` `.pth` state dicts, GPT-2's GGUF names, reading safetensors files (and writing one a
tensor at a time), and `materialize`, which checks names and shapes and stops with one line naming the first missing, unexpected or
mis-shaped tensor. The other families' names are in weight_maps.py, driven by their table entry.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from instructkit.errors import UserError
from instructkit.models.gpt2 import GPT2_PRESETS, GPT2Config

# HF GPT-2 stores these as Conv1D (in, out); nn.Linear wants (out, in).
_GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def gpt2_from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ours = {}
    for name, tensor in state.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers, not parameters
        name = name.removeprefix("transformer.")
        if name == "lm_head.weight":
            continue  # tied to wte
        if name.endswith(_GPT2_CONV1D):
            tensor = tensor.t()
        ours[f"transformer.{name}"] = tensor.contiguous()
    return ours


def gpt2_config_from_hf(config: dict) -> GPT2Config:
    return GPT2Config(
        vocab_size=config["vocab_size"],
        context_length=config.get("n_positions", 1024),
        emb_dim=config["n_embd"],
        n_layers=config["n_layer"],
        n_heads=config["n_head"],
        layer_norm_eps=config.get("layer_norm_epsilon", 1e-5),
    )


def gpt2_to_chapter(state: dict[str, torch.Tensor], config: GPT2Config) -> dict[str, torch.Tensor]:
    """Our GPT-2 state dict in the book's GPTModel names (separate Q/K/V, scale/shift norms)."""
    out = {
        "tok_emb.weight": state["transformer.wte.weight"],
        "pos_emb.weight": state["transformer.wpe.weight"],
        "final_norm.scale": state["transformer.ln_f.weight"],
        "final_norm.shift": state["transformer.ln_f.bias"],
        "out_head.weight": state["lm_head.weight"] if "lm_head.weight" in state else state["transformer.wte.weight"],
    }
    for i in range(config.n_layers):
        ours, theirs = f"transformer.h.{i}.", f"trf_blocks.{i}."
        q, k, v = state[ours + "attn.c_attn.weight"].chunk(3, dim=0)
        out |= {theirs + "att.W_query.weight": q, theirs + "att.W_key.weight": k, theirs + "att.W_value.weight": v}
        if config.qkv_bias:
            qb, kb, vb = state[ours + "attn.c_attn.bias"].chunk(3, dim=0)
            out |= {theirs + "att.W_query.bias": qb, theirs + "att.W_key.bias": kb, theirs + "att.W_value.bias": vb}
        out |= {
            theirs + "att.out_proj.weight": state[ours + "attn.c_proj.weight"],
            theirs + "att.out_proj.bias": state[ours + "attn.c_proj.bias"],
            theirs + "ff.layers.0.weight": state[ours + "mlp.c_fc.weight"],
            theirs + "ff.layers.0.bias": state[ours + "mlp.c_fc.bias"],
            theirs + "ff.layers.2.weight": state[ours + "mlp.c_proj.weight"],
            theirs + "ff.layers.2.bias": state[ours + "mlp.c_proj.bias"],
            theirs + "norm1.scale": state[ours + "ln_1.weight"],
            theirs + "norm1.shift": state[ours + "ln_1.bias"],
            theirs + "norm2.scale": state[ours + "ln_2.weight"],
            theirs + "norm2.shift": state[ours + "ln_2.bias"],
        }
    return {name: tensor.detach().clone() for name, tensor in out.items()}


def gpt2_from_chapter(state: dict[str, torch.Tensor], source: str) -> tuple[GPT2Config, dict[str, torch.Tensor]]:
    """Read a chapter `.pth` state dict; the size is inferred from its shapes."""
    try:
        return _gpt2_from_chapter(state, source)
    except KeyError as exc:
        raise UserError(f"{source}: missing tensor {exc.args[0]!r} (not a complete chapter GPTModel state dict)") from None


def _gpt2_from_chapter(state: dict[str, torch.Tensor], source: str) -> tuple[GPT2Config, dict[str, torch.Tensor]]:
    try:
        vocab, emb_dim = state["tok_emb.weight"].shape
        context = state["pos_emb.weight"].shape[0]
    except KeyError as exc:
        raise UserError(f"{source}: not a chapter GPTModel state dict (no tensor {exc.args[0]!r})") from None
    n_layers = 1 + max(int(m.group(1)) for key in state if (m := re.match(r"trf_blocks\.(\d+)\.", key)))
    heads = {preset.emb_dim: preset.n_heads for name, preset in GPT2_PRESETS.items() if not name.startswith("tiny")}
    heads[GPT2_PRESETS["tiny-gpt2"].emb_dim] = GPT2_PRESETS["tiny-gpt2"].n_heads
    if emb_dim not in heads:
        raise UserError(f"{source}: embedding width {emb_dim} matches no GPT-2 size (768, 1024, 1280, 1600)")
    config = GPT2Config(
        vocab_size=vocab, context_length=context, emb_dim=emb_dim, n_layers=n_layers, n_heads=heads[emb_dim],
        qkv_bias="trf_blocks.0.att.W_query.bias" in state,
    )
    ours = {
        "transformer.wte.weight": state["tok_emb.weight"],
        "transformer.wpe.weight": state["pos_emb.weight"],
        "transformer.ln_f.weight": state["final_norm.scale"],
        "transformer.ln_f.bias": state["final_norm.shift"],
    }
    for i in range(n_layers):
        ours_prefix, theirs = f"transformer.h.{i}.", f"trf_blocks.{i}."
        get = lambda name: state[theirs + name]  # noqa: E731
        ours[ours_prefix + "attn.c_attn.weight"] = torch.cat([get("att.W_query.weight"), get("att.W_key.weight"), get("att.W_value.weight")])
        if config.qkv_bias:
            ours[ours_prefix + "attn.c_attn.bias"] = torch.cat([get("att.W_query.bias"), get("att.W_key.bias"), get("att.W_value.bias")])
        else:
            ours[ours_prefix + "attn.c_attn.bias"] = torch.zeros(3 * emb_dim)
        ours |= {
            ours_prefix + "attn.c_proj.weight": get("att.out_proj.weight"),
            ours_prefix + "attn.c_proj.bias": get("att.out_proj.bias"),
            ours_prefix + "mlp.c_fc.weight": get("ff.layers.0.weight"),
            ours_prefix + "mlp.c_fc.bias": get("ff.layers.0.bias"),
            ours_prefix + "mlp.c_proj.weight": get("ff.layers.2.weight"),
            ours_prefix + "mlp.c_proj.bias": get("ff.layers.2.bias"),
            ours_prefix + "ln_1.weight": get("norm1.scale"),
            ours_prefix + "ln_1.bias": get("norm1.shift"),
            ours_prefix + "ln_2.weight": get("norm2.scale"),
            ours_prefix + "ln_2.bias": get("norm2.shift"),
        }
    return config, ours


_GGUF_GPT2_LAYER = {
    "attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj",
}


def gpt2_from_gguf(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    simple = {"token_embd": "transformer.wte", "position_embd": "transformer.wpe", "output_norm": "transformer.ln_f"}
    ours = {}
    for name, tensor in tensors.items():
        stem, _, kind = name.rpartition(".")
        if stem in simple:
            ours[f"{simple[stem]}.{kind}"] = tensor
        elif stem == "output":
            continue
        elif (m := re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)) and m.group(2) in _GGUF_GPT2_LAYER:
            ours[f"transformer.h.{m.group(1)}.{_GGUF_GPT2_LAYER[m.group(2)]}.{kind}"] = tensor
        else:
            raise UserError(f"GGUF tensor {name!r} is not part of the GPT-2 architecture")
    return ours


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, or one line naming it when it is missing, truncated
    (a kill mid-copy, a full disk) or not safetensors at all."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"{path}: missing; the model folder is incomplete")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path}: not a complete safetensors file ({path.stat().st_size:,} bytes; "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); the weights are damaged") from None


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def iter_safetensors_fp32(path: Path, keep_half_matrices: bool = False):
    """(name, fp32 tensor) for each tensor of a safetensors file, read one at a time with plain
    file reads: a bf16 checkpoint of N parameters costs the N fp32 values plus one tensor's bytes,
    never the whole file beside its fp32 copy (a memory map would keep the pages it read).
    `keep_half_matrices`: bf16 / fp16 matrices come as stored (a FrozenLinears encodes them from there)."""
    import json
    import struct

    if not path.is_file():
        raise UserError(f"{path}: missing; the model folder is incomplete")
    size = path.stat().st_size
    try:
        with open(path, "rb") as file:
            (header_size,) = struct.unpack("<Q", file.read(8))
            if header_size > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(file.read(header_size))
            start = 8 + header_size
            for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0] if item[0] != "__metadata__" else -1):
                if name == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                if start + end > size:
                    raise ValueError(f"tensor {name!r} ends past the end of the file")
                dtype = _SAFETENSORS_DTYPES[info["dtype"]]
                file.seek(start + begin)
                raw = bytearray(end - begin)
                file.readinto(raw)
                tensor = torch.frombuffer(raw, dtype=dtype).reshape(info["shape"]) if raw else torch.empty(info["shape"], dtype=dtype)
                kept = keep_half_matrices and tensor.dtype in (torch.bfloat16, torch.float16) and tensor.dim() == 2
                yield name, tensor.float() if tensor.is_floating_point() and not kept else tensor
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise UserError(f"{path}: not a complete safetensors file ({size:,} bytes; {type(exc).__name__}: {exc}); "
                        "the weights are damaged") from None


@dataclass(frozen=True)
class LazyTensor:
    """A tensor made only when its turn to be written comes (`write_safetensors`): its shape and
    dtype are known before, its values (a merged layer, a dequantized one) exist one at a time."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor | LazyTensor]) -> None:
    """A safetensors file (the format's layout: an 8-byte little-endian header size, the JSON
    header naming each tensor's dtype, shape and byte range, padded with spaces to 8 bytes, then
    the data), each LazyTensor made, written and dropped in turn. safetensors' own save_file
    needs every tensor in memory at once; this writes a model far larger than what is free beside
    it. Read back by safetensors itself (tests/test_quantized_base.py)."""
    import json
    import struct

    names = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
    header, offset = {}, 0
    for name in sorted(tensors):
        value = tensors[name]
        size = math.prod(value.shape) * value.dtype.itemsize
        header[name] = {"dtype": names[value.dtype], "shape": list(value.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, info in header.items():
            value = tensors[name]
            tensor = value.make() if isinstance(value, LazyTensor) else value
            if tuple(tensor.shape) != tuple(info["shape"]) or names.get(tensor.dtype) != info["dtype"]:
                raise ValueError(f"{name}: made {tuple(tensor.shape)} {tensor.dtype}, declared {info['shape']} {info['dtype']}")
            file.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
            del tensor  # before the next one is made


def check_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Stop with one line at the first missing, unexpected or mis-shaped tensor."""
    expected = model.state_dict()
    tied = getattr(model.config, "tie_embeddings", True)
    for name, tensor in expected.items():
        if name not in state:
            if name == "lm_head.weight" and tied:
                continue  # tied to the token embedding
            raise UserError(f"{source}: missing tensor {name!r} (is this checkpoint for a different model?)")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise UserError(
                f"{source}: tensor {name!r} has shape {tuple(state[name].shape)}, "
                f"the model expects {tuple(tensor.shape)}"
            )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise UserError(f"{source}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")


@contextlib.contextmanager
def skip_weight_init():
    """Make torch.nn.init a no-op while building a model whose weights are about to be replaced:
    random init of Gemma's 168M-value embedding alone takes seconds on a CPU. (The meta device
    would do too, but its first use imports ~2 s of torch internals.)"""
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_", "trunc_normal_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    try:
        for name in names:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


@dataclass(frozen=True)
class FrozenLinears:
    """For a caller that holds the body's frozen linear layers in another form (LoRA on an int8 /
    int4 base: train/quantized_base.py). `encode` turns one layer's weight (out, in), as read
    (bf16, fp16 or fp32), into its stored form, or returns None to keep it a plain fp32 weight;
    `build` makes the layer from that form and its fp32 bias (or None). A loader encodes each
    weight as it is read, so the body never exists in 16 or 32 bits as a whole: one layer's
    weight at a time."""
    encode: Callable[[torch.Tensor], object | None]
    build: Callable[[object, torch.Tensor | None], torch.nn.Module]


@dataclass(frozen=True)
class EncodedWeight:
    """A weight in a FrozenLinears' stored form, with the shape it stands for (check_state)."""
    shape: tuple[int, ...]
    stored: object


def skeleton(build, config) -> torch.nn.Module:
    """The model without random init, its parameters about to be replaced (materialize)."""
    with skip_weight_init():
        return build(config)


def frozen_weight_names(model: torch.nn.Module) -> set[str]:
    """The weights FrozenLinears may hold: every linear layer's but the head's."""
    return {f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")}


def hold(name: str, tensor: torch.Tensor, names: set[str], frozen: FrozenLinears | None):
    """`tensor` as the state keeps it: encoded where `frozen` holds the weight `name`, else as read."""
    if frozen is None or name not in names or not isinstance(tensor, torch.Tensor):
        return tensor
    stored = frozen.encode(tensor)
    return tensor.float() if stored is None else EncodedWeight(tuple(tensor.shape), stored)


def materialize(model: torch.nn.Module, state: dict, source: str | Path, *,
                frozen: FrozenLinears | None = None) -> torch.nn.Module:
    """Check the state dict against the `skeleton`, then adopt its tensors as the fp32 parameters
    and re-tie the LM head. With `frozen`, each body linear layer becomes `frozen.build` of its
    weight, encoded here unless the loader already did (`hold`, as each tensor was read).
    `state` is consumed: each layer's entries leave it as the layer is made, so a stored form and
    the layer made from it (which may be a copy) coexist one layer at a time."""
    check_state(model, state, source)
    if getattr(model.config, "tie_embeddings", True):
        state.pop("lm_head.weight", None)
    names = frozen_weight_names(model) if frozen else set()
    for name in names & state.keys():
        state[name] = hold(name, state[name], names, frozen)
    for name in [name for name, value in state.items() if isinstance(value, EncodedWeight)]:
        layer = name.removesuffix(".weight")
        weight, bias = state.pop(name), state.pop(f"{layer}.bias", None)
        model.set_submodule(layer, frozen.build(weight.stored, None if bias is None else bias.float()))
        del weight
    model.load_state_dict({name: tensor.float() for name, tensor in state.items()}, strict=False, assign=True)
    state.clear()
    model.tie_weights()
    return model.eval()


# Writing: our state dicts in other tools' names (the inverse of the readers above) -------------
def gpt2_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF GPT2LMHeadModel names: ours are the same, with Conv1D weights stored (in, out)."""
    return {name: (tensor.t() if name.endswith(_GPT2_CONV1D) else tensor).contiguous()
            for name, tensor in state.items() if name != "lm_head.weight"}


def gpt2_hf_config(config: GPT2Config) -> dict:
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
            "n_positions": config.context_length, "n_ctx": config.context_length, "n_embd": config.emb_dim,
            "n_layer": config.n_layers, "n_head": config.n_heads, "n_inner": None, "activation_function": "gelu_new",
            "resid_pdrop": config.drop_rate, "embd_pdrop": config.drop_rate, "attn_pdrop": config.drop_rate,
            "layer_norm_epsilon": config.layer_norm_eps, "tie_word_embeddings": True, "torch_dtype": "float32"}


def gpt2_to_gguf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    simple = {"transformer.wte": "token_embd", "transformer.wpe": "position_embd", "transformer.ln_f": "output_norm"}
    ours_to_gguf = {ours: gguf for gguf, ours in _GGUF_GPT2_LAYER.items()}
    out = {}
    for name, tensor in state.items():
        stem, _, kind = name.rpartition(".")
        if name == "lm_head.weight":
            continue
        if stem in simple:
            out[f"{simple[stem]}.{kind}"] = tensor
        elif m := re.fullmatch(r"transformer\.h\.(\d+)\.(.+)", stem):
            out[f"blk.{m.group(1)}.{ours_to_gguf[m.group(2)]}.{kind}"] = tensor
        else:
            raise ValueError(f"no GGUF name for {name}")
    return out
