"""Writing GGUF files for llama.cpp and Ollama with the ``gguf`` package: a full model, a LoRA adapter, and a copy of
a source GGUF with the run's chat template added.

Tensor names come from ``gguf.get_tensor_name_map``; the per-architecture changes are the ones llama.cpp's
``convert_hf_to_gguf.py`` makes (Gemma 3: norm weights +1; Llama: the q/k rotary permutation of ``LlamaModel.permute``,
also on LoRA B; Qwen2: biases kept), so a file written here matches that converter's. The LoRA layout is the one
``convert_lora_to_gguf.py`` writes (``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``,
tensors ``<name>.lora_a`` / ``<name>.lora_b``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapters.utils.errors import AdaptersError


class GGUFExportError(AdaptersError, RuntimeError):
    """The run cannot be written as GGUF as asked; the message says why and what to do."""


# Our model_type -> gguf architecture. Other families go through llama.cpp's own converter (--llama-cpp DIR).
ARCHS = {"gemma3_text": "GEMMA3", "llama": "LLAMA", "qwen2": "QWEN2"}
FULL_TYPES = ("f32", "f16", "bf16", "q8_0")
LOW_TYPES = ("q5_1", "q5_0", "q4_1", "q4_0")  # gguf.quants writes these, not the K-quants
LOW_TYPE_REASON = (
    "measured here on the demo run: 4-bit K-quants of the merged model erased the fine-tune (0/20 answers kept), "
    "Q8_0 kept it (20/20); like merging into a 4-bit base, rounding to 4-5 bits removes most of the LoRA update"
)
PRETOKENIZER = {"llama": "llama-bpe", "qwen2": "qwen2", "gemma3_text": "default"}


def gguf_arch(config) -> str:
    """The gguf architecture name of a transformers config; other families are refused with what to do."""
    import gguf

    mt = getattr(config, "model_type", None)
    if mt not in ARCHS:
        raise GGUFExportError(
            f"model_type {mt!r}: GGUF export here supports Gemma 3 (text), Llama and Qwen2; for another family "
            "pass --llama-cpp DIR (a llama.cpp checkout) so its convert_hf_to_gguf.py converts the merged model"
        )
    return gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[ARCHS[mt]]]


def qtype(outtype: str):
    import gguf

    return {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
        "q5_1": gguf.GGMLQuantizationType.Q5_1,
        "q5_0": gguf.GGMLQuantizationType.Q5_0,
        "q4_1": gguf.GGMLQuantizationType.Q4_1,
        "q4_0": gguf.GGMLQuantizationType.Q4_0,
    }[outtype]


def file_type(outtype: str) -> int:
    import gguf

    return int(getattr(gguf.LlamaFileType, "ALL_F32" if outtype == "f32" else f"MOSTLY_{outtype.upper()}"))


# ---------------------------------------------------------------------------------------------------- tensors
def permute(w: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute``: HF's rotate-half q/k rows -> GGML's interleaved rotary layout."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _qk_heads(config, hf_name: str) -> tuple[int, int | None] | None:
    """(n_head, n_head_kv) when ``hf_name`` is a Llama q/k projection that needs the permutation, else None."""
    if config.model_type != "llama":
        return None
    n, kv = config.num_attention_heads, config.num_key_value_heads
    if ".q_proj." in hf_name:
        return n, n
    if ".k_proj." in hf_name:
        return n, kv
    return None


def _tied(config) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))


def map_name(tmap, hf_name: str) -> str:
    new = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if new is None:
        raise GGUFExportError(f"tensor {hf_name!r}: no GGUF name for it in gguf's tensor map")
    return new


def model_tensors(state: dict[str, torch.Tensor], config) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, fp32 tensor) for every weight of a full model, transformed as llama.cpp's converter does."""
    import gguf

    arch = gguf.MODEL_ARCH[ARCHS[config.model_type]]
    tmap = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for name, t in state.items():
        if name == "lm_head.weight" and _tied(config):
            continue  # tied to token_embd: llama.cpp uses the embedding
        if name.endswith("rotary_emb.inv_freq"):
            continue
        t = t.detach().float().cpu()
        if config.model_type == "gemma3_text" and name.endswith("norm.weight"):
            t = t + 1  # Gemma3RMSNorm multiplies by (1 + w); GGML's norm by w
        if (heads := _qk_heads(config, name)) is not None:
            t = permute(t, *heads)
        yield map_name(tmap, name), t
    yield from _rope_freqs(config)


def _rope_freqs(config) -> Iterator[tuple[str, torch.Tensor]]:
    """Llama 3 rope scaling as a ``rope_freqs`` tensor (``LlamaModel.generate_extra_tensors``)."""
    import gguf

    rp = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if config.model_type != "llama" or str(rp.get("rope_type", "")).lower() != "llama3":
        return
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (rp.get("rope_theta", 10000.0) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, lo, hi = rp.get("factor", 8.0), rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old = rp.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", torch.tensor(out, dtype=torch.float32)


def encode(t: torch.Tensor, outtype: str) -> tuple[np.ndarray, Any]:
    """(array, raw GGML type or None) as the converter stores it: 1-D tensors in F32, the rest in ``outtype``;
    a row that does not fit the quant block falls back to F16, as llama.cpp's converter does."""
    import gguf
    from gguf.quants import QuantError, quantize

    a = t.detach().float().cpu().numpy()
    if a.ndim <= 1 or outtype == "f32":
        return a.astype(np.float32), None
    if outtype == "f16":
        return a.astype(np.float16), None
    try:
        return quantize(a, qtype(outtype)), qtype(outtype)
    except QuantError:
        return a.astype(np.float16), gguf.GGMLQuantizationType.F16


# ---------------------------------------------------------------------------------------------------- metadata
def write_hparams(w, config) -> None:
    """The hyperparameters llama.cpp reads, as ``TextModel.set_gguf_parameters`` and the family classes write them."""
    c = config
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    rp = getattr(c, "rope_parameters", None) or {}
    full = rp.get("full_attention", rp) if isinstance(rp, dict) else {}
    theta = full.get("rope_theta", getattr(c, "rope_theta", None))
    if theta is not None:
        w.add_rope_freq_base(theta)
    head_dim = getattr(c, "head_dim", None)
    if c.model_type == "gemma3_text":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        if (cap := getattr(c, "final_logit_softcapping", None)) is not None:
            w.add_final_logit_softcapping(cap)
        if getattr(c, "sliding_window_pattern", None) != 1:
            w.add_sliding_window(c.sliding_window)
        if (local := (rp.get("sliding_attention") or {}).get("rope_theta")) is not None:
            w.add_rope_freq_base_swa(local)
    elif c.model_type == "llama":
        w.add_vocab_size(c.vocab_size)
        w.add_rope_dimension_count(head_dim or c.hidden_size // c.num_attention_heads)


def write_vocab(w, tok, config) -> None:
    """A byte-level BPE vocabulary (``tokenizer.ggml.model = gpt2``) from a transformers tokenizer, as the
    converter's ``_set_vocab_gpt2`` writes it. Sentencepiece-style vocabularies (Gemma's) are copied from the
    source GGUF instead: rebuilt from ``tokenizer.json`` they decode byte tokens wrongly in llama.cpp."""
    import gguf

    vocab = tok.get_vocab()
    n = max(config.vocab_size, max(vocab.values()) + 1)
    reverse = {i: t for t, i in vocab.items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(n):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(PRETOKENIZER.get(config.model_type, "default"))
    w.add_token_list(tokens)
    w.add_token_types(types)
    merges = _merges(tok)
    if merges:
        w.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tok, f"{kind}_token_id", None)
        if tid is not None:
            getattr(w, f"add_{kind}_token_id")(int(tid))
    w.add_add_bos_token(bool(getattr(tok, "add_bos_token", False)))


def _merges(tok) -> list[str]:
    import json

    model = json.loads(tok.backend_tokenizer.to_str()).get("model", {})
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def copy_fields(w, reader, prefix: str = "", skip: tuple[str, ...] = ()) -> None:
    """Copy KV fields (name starting with ``prefix``) from a GGUFReader, with their exact value types."""
    import gguf

    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or not name.startswith(prefix) or name in skip:
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, f.contents(), vtype, sub)


# ---------------------------------------------------------------------------------------------------- files
def _finish(w, path: Path) -> None:
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_model(
    path: Path,
    state: dict[str, torch.Tensor],
    config,
    tok,
    outtype: str,
    chat_template: str | None,
    name: str,
    source_gguf: Path | None = None,
) -> Path:
    """A full model GGUF: hyperparameters, vocabulary (the source GGUF's when there is one), the chat template
    (none for a run trained raw), and every tensor in ``outtype``."""
    import gguf

    w = gguf.GGUFWriter(str(path), gguf_arch(config))
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    write_hparams(w, config)
    if source_gguf is not None:
        copy_fields(w, gguf.GGUFReader(str(source_gguf)), "tokenizer.", skip=("tokenizer.chat_template",))
    else:
        write_vocab(w, tok, config)
    if chat_template:
        w.add_chat_template(chat_template)
    return _write_tensors(w, model_tensors(state, config), outtype, path)


def _write_tensors(w, tensors, outtype: str, path: Path) -> Path:
    """The (GGUF name, tensor) pairs in ``outtype``, the file type, then the file written (``_finish``)."""
    import gguf

    for gname, t in tensors:
        arr, raw = encode(t, outtype)
        w.add_tensor(gname, arr, raw_dtype=raw)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(file_type(outtype))
    _finish(w, path)
    return path


def copy_with_template(src: Path, dst: Path, chat_template: str | None) -> Path:
    """The source GGUF, byte-for-byte tensors and metadata, with ``tokenizer.chat_template`` set to the run's (or
    none, for a run trained raw: its prompts are plain text)."""
    import gguf

    r = gguf.GGUFReader(str(src))
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch)
    copy_fields(w, r, skip=("general.architecture", "tokenizer.chat_template"))
    if chat_template:
        w.add_chat_template(chat_template)
    for t in r.tensors:  # raw bytes and type: nothing is re-quantized
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    _finish(w, dst)
    return dst


def lora_pairs(adapter_state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """HF base weight name -> {"A": lora_A, "B": lora_B} from a PEFT adapter state dict."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in adapter_state.items():
        for part, tag in ((".lora_A.weight", "A"), (".lora_B.weight", "B")):
            if key.endswith(part):
                base = key.removeprefix("base_model.model.").removesuffix(part) + ".weight"
                pairs.setdefault(base, {})[tag] = t
                break
        else:
            raise GGUFExportError(
                f"adapter tensor {key!r}: only LoRA A/B matrices go into a llama.cpp adapter (no DoRA magnitudes, "
                "LoRA biases, trained embeddings or modules_to_save); use --mode merged"
            )
    return pairs


def lora_alpha(adapter_cfg: dict[str, Any]) -> float:
    """The ``adapter.lora.alpha`` that gives llama.cpp's scale alpha/r the same value as PEFT's."""
    if adapter_cfg.get("use_dora"):
        raise GGUFExportError(
            "adapter_config.json: use_dora is set; llama.cpp adapters are plain LoRA: use --mode merged"
        )
    if adapter_cfg.get("rank_pattern") or adapter_cfg.get("alpha_pattern"):
        raise GGUFExportError(
            "adapter_config.json: rank_pattern/alpha_pattern give per-module scales; a llama.cpp adapter has one "
            "alpha: use --mode merged"
        )
    alpha, r = float(adapter_cfg["lora_alpha"]), int(adapter_cfg["r"])
    return alpha * math.sqrt(r) if adapter_cfg.get("use_rslora") else alpha  # rsLoRA scales by alpha/sqrt(r)


def lora_tensors(adapter_state: dict[str, torch.Tensor], config) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor): ``<name>.lora_a`` = A (r x in), ``<name>.lora_b`` = B (out x r), the Llama q/k
    permutation applied to B's rows, as convert_lora_to_gguf.py does."""
    import gguf

    arch = gguf.MODEL_ARCH[ARCHS[config.model_type]]
    tmap = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for hf_name, ab in sorted(lora_pairs(adapter_state).items()):
        if set(ab) != {"A", "B"}:
            raise GGUFExportError(f"adapter tensor {hf_name!r}: lora_A or lora_B is missing")
        a, b = ab["A"].detach().float().cpu(), ab["B"].detach().float().cpu()
        if (heads := _qk_heads(config, hf_name)) is not None:
            b = permute(b, *heads)
        gname = map_name(tmap, hf_name)
        if gname.startswith("token_embd"):
            a = a.T  # llm_build_inp_embd reads the embedding's A transposed
        yield gname + ".lora_a", a
        yield gname + ".lora_b", b


def write_lora(
    path: Path, adapter_state: dict[str, torch.Tensor], adapter_cfg: dict[str, Any], config, outtype: str, name: str
) -> Path:
    """A LoRA adapter GGUF for llama.cpp's ``--lora`` and Ollama's ``ADAPTER``."""
    import gguf

    w = gguf.GGUFWriter(str(path), gguf_arch(config))
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora_alpha(adapter_cfg))
    w.add_name(name)
    return _write_tensors(w, lora_tensors(adapter_state, config), outtype, path)
