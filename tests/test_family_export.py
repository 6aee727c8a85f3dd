"""Every transformer family's GGUF export against llama.cpp (llama-cpp-python), a reference nobody
here wrote: the tiny random checkpoints of test_family_parity (made by transformers itself), exported
in F32, load in llama.cpp with the same top-1 token at every position of a sequence longer than the
families' windows, and logits within 1e-2 (llama.cpp's KV cache kept in F32, as the file is: its
F16 cache alone moves these logits by ~0.02, enough to flip near-ties); our own loader reads each
export back to the same logits (1e-4); an Ollama export of a non-Gemma family writes a Modelfile
with the family's template and stop lines.

llama.cpp runs no sliding window for its `llama` (Mistral), `qwen2` and `phi3` architectures: those
checkpoints export with the GGUF's context capped at the window, where the two agree (checked on
the window's positions, with the one-line notice), and the same checkpoints without a window are
checked over the long sequence. Gemma 2's parity checkpoint soft-caps its logits at 3.0, which
flattens them into near-ties; here it caps at 30.0 (Gemma 2's own value), still soft-capping, and
scales queries by 1/sqrt(24) where llama.cpp fixes 1/sqrt(head_dim) = 1/4 for its shape (as
Gemma 2 27B differs from its head_dim), which the export folds into the query weights.
Qwen's checkpoint pads its embedding past the tokenizer (as Qwen does), so the GGUF's vocabulary
is padded with unused tokens. Gemma's weights are drawn with std 0.1, not the parity tests' 0.05:
there the top two of 50,257 logits come within ~1e-4 of each other, under llama.cpp's ~1e-3
differences on Gemma; the test asserts that every position's top-1 is decisive.
"""

from __future__ import annotations

import contextlib
import io
from unittest import mock

import numpy as np
import pytest
import torch

from instructkit.data.prompts import get_prompt_style, resolve_prompt_style
from instructkit.errors import UserError
from instructkit.export import export_model
from instructkit.export.templates import go_template
from instructkit.models.families import GEMMA3, LLAMA, QWEN3
from instructkit.models.gguf_convert import convert_gguf, read_gguf
from instructkit.models.registry import LoadedModel, load_model
from instructkit.models.tokenizer import gpt2_tokenizer
from instructkit.models.transformer import Transformer, TransformerConfig

from . import test_family_parity as parity
from .conftest import require_module

llama_cpp = require_module("llama_cpp")

STEPS = 56  # past the parity checkpoints' 5-token windows and Phi-3's 48-position original context
# The parity configs, changed where llama.cpp cannot follow them over STEPS tokens or to exercise
# more of the export (see above).
EXACT = {
    "mistral": {"sliding_window": None},
    "qwen2": {"use_sliding_window": False, "vocab_size": parity.VOCAB + 47},  # padded to 50,304
    "phi3": {"sliding_window": None},
    "gemma2": {"final_logit_softcapping": 30.0, "query_pre_attn_scalar": 24},
}
STD = {"gemma2": 0.1, "gemma3": 0.1}  # initializer std where it differs from the parity checkpoints'
CAPPED = ["mistral", "qwen2", "phi3"]


def _checkpoint(family: str, folder, changes: dict | None = None, std: float | None = None):
    """test_family_parity's checkpoint of `family`, its transformers config changed by `changes`,
    its weights drawn with `std` if given."""
    if not changes and std is None:
        return parity.make_checkpoint(family, folder)
    config, parity_std = parity._configs()[family]
    values = {key: value for key, value in config.to_dict().items() if key != "layer_types"}
    changed = type(config).from_dict({**values, **(changes or {})})
    with mock.patch.object(parity, "_configs", lambda: {family: (changed, std or parity_std)}):
        return parity.make_checkpoint(family, folder)


def _export(loaded, out, fmt="gguf", quant="f32"):
    """export_model in the model's own prompt style, with what it prints to stderr (its notices)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        exported = export_model(loaded, resolve_prompt_style(loaded.default_prompt_style, loaded), fmt, out, quant=quant)
    return exported, err.getvalue()


def _ids(steps: int = STEPS) -> torch.Tensor:
    return torch.randint(0, parity.VOCAB - 1, (1, steps), generator=torch.Generator().manual_seed(4))


def _llama_cpp_logits(path, ids: torch.Tensor) -> np.ndarray:
    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=128, n_threads=2, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm.eval(ids[0].tolist())
    return np.asarray(llm.scores[: ids.shape[1]], dtype=np.float64)


def _ours(loaded, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return loaded.model(ids)[0].double().numpy()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """family -> (family, loaded checkpoint, its F32 GGUF, what the export printed), made once."""
    made = {}

    def export(family: str):
        if family not in made:
            folder = tmp_path_factory.mktemp(family)
            _checkpoint(family, folder / "hf", EXACT.get(family), STD.get(family))
            loaded = load_model(str(folder / "hf"))
            result, notices = _export(loaded, folder / "gguf")
            made[family] = family, loaded, result.files[0], notices
        return made[family]

    return export


@pytest.fixture(params=parity.FAMILIES)
def exported(request, exports):
    return exports(request.param)


def test_llama_cpp_gives_our_top1_at_every_position(exported):
    family, loaded, path, notices = exported
    assert loaded.model.config.family == family and path.name == "model-f32.gguf"
    # Nothing to say, but for Phi-3's longrope: llama.cpp picks its factors by n_ctx, not by the text.
    assert notices == ("" if family != "phi3" else "note: phi3: llama.cpp picks the long RoPE factors by the context "
                       "it is run with (n_ctx above 48), not by the text's length as transformers does\n"), family
    ids = _ids()
    theirs, ours = _llama_cpp_logits(path, ids), _ours(loaded, ids)
    assert (theirs.argmax(-1) == ours.argmax(-1)).all(), (family, np.flatnonzero(theirs.argmax(-1) != ours.argmax(-1)))
    differences = np.abs(theirs - ours).max(-1)
    assert differences.max() <= 1e-2, family
    top2 = np.sort(ours, -1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0] > differences).all(), family  # decisive: no near-tie agreed by chance


def test_our_loader_reads_the_export_back(exported, tmp_path):
    family, loaded, path, _ = exported
    back = load_model(str(convert_gguf(path, tmp_path / "back")))
    assert back.model.config.family == ("llama" if family == "mistral" else family)  # no window: a Llama
    ids = _ids()
    assert np.abs(_ours(back, ids) - _ours(loaded, ids)).max() <= 1e-4, family


def test_a_padded_embedding_pads_the_vocabulary(exports):
    _, loaded, path, _ = exports("qwen2")
    fields = read_gguf(path).fields
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == loaded.model.config.vocab_size == parity.VOCAB + 47
    assert tokens[parity.VOCAB:] == [f"[PAD{i}]" for i in range(parity.VOCAB, parity.VOCAB + 47)]
    assert set(types[parity.VOCAB:]) == {5}  # llama.cpp's UNUSED


@pytest.mark.parametrize("family", CAPPED)
def test_a_window_llama_cpp_does_not_run_caps_the_context(family, tmp_path):
    _checkpoint(family, tmp_path / "hf")  # the parity checkpoint: a 5-token window
    loaded = load_model(str(tmp_path / "hf"))
    window = loaded.model.config.sliding_window
    assert window == parity.WINDOW
    result, notices = _export(loaded, tmp_path / "gguf")
    lines = notices.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"note: {family}: ")
    assert f"capped at the window ({window} tokens)" in lines[0]
    arch = "llama" if family == "mistral" else family
    assert read_gguf(result.files[0]).fields[f"{arch}.context_length"].contents() == window
    ids = _ids(window)
    theirs, ours = _llama_cpp_logits(result.files[0], ids), _ours(loaded, ids)
    assert (theirs.argmax(-1) == ours.argmax(-1)).all() and np.abs(theirs - ours).max() <= 1e-2
    # Our reader keeps the window (past the cap too; Phi-3 within its original 48 positions, as
    # the capped GGUF holds only the short RoPE factors).
    back = load_model(str(convert_gguf(result.files[0], tmp_path / "back")))
    assert back.model.config.family == family and back.model.config.sliding_window == window
    assert np.abs(_ours(back, _ids(40)) - _ours(loaded, _ids(40))).max() <= 1e-4


SHAPE = dict(vocab_size=parity.VOCAB, context_length=256, emb_dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16,
             hidden_dim=96)


@pytest.mark.parametrize(("spec", "changes", "reason"), [
    (GEMMA3, dict(attn_softcap=50.0), "soft-capping of attention scores"),
    (LLAMA, dict(rotary_dim=8), "partial rotary embeddings"),
    (QWEN3, dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 32}), "llama3 RoPE scaling"),
], ids=["gemma3", "llama", "qwen3"])
def test_what_llama_cpp_cannot_run_is_refused_in_one_line(spec, changes, reason, tmp_path):
    config = TransformerConfig(family=spec.name, **spec.switches, **SHAPE, **changes)
    loaded = LoadedModel(model=Transformer(config), tokenizer=gpt2_tokenizer(), name="x", tokenizer_ref={})
    with pytest.raises(UserError) as refused:
        _export(loaded, tmp_path / "gguf")
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{spec.name}: ") and reason in message, message
    assert not (tmp_path / "gguf").exists()


def test_ollama_export_of_a_non_gemma_family(exports, tmp_path):
    """Phi-3, with its own prompt style."""
    _, loaded, _, _ = exports("phi3")
    _, _ = _export(loaded, tmp_path / "ollama", fmt="ollama", quant="q8_0")
    style = get_prompt_style("phi3")
    modelfile = (tmp_path / "ollama" / "Modelfile").read_text()
    assert modelfile.startswith('FROM ./model.gguf\nTEMPLATE """')
    assert f'TEMPLATE """{go_template(style, loaded.tokenizer.eos_text)}"""' in modelfile
    assert [line for line in modelfile.splitlines() if line.startswith("PARAMETER stop")] == \
        [f'PARAMETER stop "{stop}"' for stop in style.stop_strings]
    assert "PARAMETER temperature 0" in modelfile
    assert f"PARAMETER num_ctx {loaded.model.config.context_length}" in modelfile
    llm = llama_cpp.Llama(str(tmp_path / "ollama" / "model.gguf"), n_ctx=128, n_threads=2, verbose=False)
    assert llm.metadata["general.architecture"] == "phi3" and "<|assistant|>" in llm.metadata["tokenizer.chat_template"]
