"""Build a tiny Qwen3 model, fully offline, for tests of Qwen3's thinking and non-thinking modes.

The folder is a real ``Qwen3ForCausalLM`` checkpoint that vLLM loads like any other: Qwen3's own chat template
(``enable_thinking`` included), Qwen3's special and ``<think>``/``</think>`` tokens, and about 0.6 M float32
weights. The weights are random except for one planted reply, so that a test can check where each part of the
answer lands:

- a prompt that ends like Qwen3's thinking-mode prompt (``<|im_start|>assistant\\n``) is answered with
  ``<think>Thinking</think>\\n\\nHello!``;
- a prompt that ends like its non-thinking prompt (``...</think>\\n\\n``) is answered with ``Hello!``.

The reply is planted as a chain of next-token rules: each token on the path has an embedding direction of its own
and the output head maps that direction to the next token with a large margin, so greedy and sampled decoding
follow it alike. Any other context gives random tokens.

Run as a script: ``python -m flushgate.engine.tiny_qwen3 DEST_DIR`` prints DEST_DIR once the folder is ready.
Only the standard library is needed (no network, no numpy): the files are written in their documented formats.
"""

from __future__ import annotations

import json
import math
import random
import struct
import sys
from array import array
from pathlib import Path
from typing import Any

from flushgate.engine.model_folder import build_once
from flushgate.engine.qwen3_chat_template import QWEN3_CHAT_TEMPLATE

"""Written last: a folder without it is never taken as a finished build."""

BUILD_VERSION = "tiny-qwen3 v1"
"""Recorded in the marker; change it whenever the output of the builder changes."""

SEED = 20250429

HIDDEN = 128
INTERMEDIATE = 256
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 32
CONTEXT = 4096

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen3 keeps these out of the special set, so they survive detokenization and reach vLLM's parsers.
PLAIN_ADDED_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")

THINKING_REPLY = "Thinking"
ANSWER_REPLY = "Hello!"

# (token, next token), in byte-level spelling: "\u010a" is "\n". Together they plant the replies above.
PLANTED_CHAIN = (
    ("\u010a", "<think>"),
    ("<think>", "Thinking"),
    ("Thinking", "</think>"),
    ("</think>", "\u010a\u010a"),
    ("\u010a\u010a", "Hello"),
    ("Hello", "!"),
    ("!", "<|im_end|>"),
)
PLANTED_WORDS = ("Thinking", "Hello", "\n\n")

_WORD_LIST = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no will can more other what up out about "
    "who into time them some could then do my than first may any like now over such our only its model token "
    "stream chunk event server client proxy request response think answer tool call weather city sky blue green "
    "light water day night good new old small large fast slow"
)
WORDS = tuple(_WORD_LIST.split())


def bytes_to_unicode() -> dict[int, str]:
    """The byte-level alphabet of GPT-2 style tokenizers: every byte as one printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def tokenizer_json() -> dict[str, Any]:
    """A byte-level BPE (the ``tokenizers`` JSON format) with whole-word merges, plus Qwen3's added tokens.

    Every word is built by merging its prefix with its next character, and the planted words come first, so
    their merges rank lowest and they always come out as single tokens.
    """
    alphabet = bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}
    merges: list[list[str]] = []
    seen: set[tuple[str, str]] = set()
    spellings = [*PLANTED_WORDS] + [form for w in WORDS for form in (w, " " + w, " " + w.capitalize())]
    for word in spellings:
        spelled = "".join(alphabet[b] for b in word.encode())
        for i in range(1, len(spelled)):
            pair = (spelled[:i], spelled[i])
            if pair not in seen:
                seen.add(pair)
                merges.append(list(pair))
            vocab.setdefault(spelled[: i + 1], len(vocab))
    added = [(t, True) for t in SPECIAL_TOKENS] + [(t, False) for t in PLAIN_ADDED_TOKENS]
    added_tokens = [
        {
            "id": len(vocab) + i,
            "content": token,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": special,
        }
        for i, (token, special) in enumerate(added)
    ]
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def token_ids(tokenizer: dict[str, Any]) -> dict[str, int]:
    ids: dict[str, int] = dict(tokenizer["model"]["vocab"])
    ids |= {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    return ids


Tensor = tuple[tuple[int, ...], "array[float]"]  # shape, float32 values in row-major order


def build_weights(ids: dict[str, int]) -> dict[str, Tensor]:
    """Random Qwen3 weights, plus the planted chain in the embeddings and the output head."""
    rng = random.Random(SEED)
    vocab = len(ids)
    planted = len(PLANTED_CHAIN)  # the first dimensions belong to the planted tokens alone
    scale = 4.0  # logit margin of a planted step: scale * sqrt(HIDDEN), about 45

    def normal(rows: int, cols: int, std: float) -> Tensor:
        return (rows, cols), array("f", (rng.gauss(0.0, std) for _ in range(rows * cols)))

    def ones(n: int) -> Tensor:
        return (n,), array("f", [1.0]) * n

    embed = normal(vocab, HIDDEN, 1.0)
    head = normal(vocab, HIDDEN, 0.2)
    for values in (embed[1], head[1]):
        for row in range(vocab):
            values[row * HIDDEN : row * HIDDEN + planted] = array("f", [0.0]) * planted
    for dim, (token, following) in enumerate(PLANTED_CHAIN):
        _set_row(embed[1], ids[token], dim, math.sqrt(HIDDEN))  # same RMS as the random rows
        _set_row(head[1], ids[following], dim, scale)

    weights = {"model.embed_tokens.weight": embed, "lm_head.weight": head, "model.norm.weight": ones(HIDDEN)}
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        weights |= {
            p + "input_layernorm.weight": ones(HIDDEN),
            p + "post_attention_layernorm.weight": ones(HIDDEN),
            p + "self_attn.q_proj.weight": normal(q, HIDDEN, 0.02),
            p + "self_attn.k_proj.weight": normal(kv, HIDDEN, 0.02),
            p + "self_attn.v_proj.weight": normal(kv, HIDDEN, 0.02),
            p + "self_attn.o_proj.weight": normal(HIDDEN, q, 0.02),
            p + "self_attn.q_norm.weight": ones(HEAD_DIM),
            p + "self_attn.k_norm.weight": ones(HEAD_DIM),
            p + "mlp.gate_proj.weight": normal(INTERMEDIATE, HIDDEN, 0.02),
            p + "mlp.up_proj.weight": normal(INTERMEDIATE, HIDDEN, 0.02),
            p + "mlp.down_proj.weight": normal(HIDDEN, INTERMEDIATE, 0.02),
        }
    return weights


def _set_row(values: array[float], row: int, dim: int, value: float) -> None:
    """Make ``row`` point along dimension ``dim`` only."""
    values[row * HIDDEN : (row + 1) * HIDDEN] = array("f", [0.0]) * HIDDEN
    values[row * HIDDEN + dim] = value


def write_safetensors(path: Path, tensors: dict[str, Tensor]) -> None:
    """The safetensors layout: 8-byte little-endian header length, a JSON header, then the raw tensors."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(tensors):
        shape, values = tensors[name]
        size = len(values) * values.itemsize
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        for name in sorted(tensors):
            values = tensors[name][1]
            if sys.byteorder == "big":
                values = array("f", values)
                values.byteswap()
            out.write(values.tobytes())


def _config(vocab_size: int, bos: int, eos: int) -> dict[str, Any]:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "max_position_embeddings": CONTEXT,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "rope_theta": 1000000.0,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "layer_types": ["full_attention"] * LAYERS,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": LAYERS,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "dtype": "float32",
        "torch_dtype": "float32",
    }


def write_model(out: Path) -> None:
    """Write every file of the checkpoint into ``out`` (an empty folder)."""
    tokenizer = tokenizer_json()
    ids = token_ids(tokenizer)
    pad, eos = ids["<|endoftext|>"], ids["<|im_end|>"]
    write_safetensors(out / "model.safetensors", build_weights(ids))
    files: dict[str, Any] = {
        "tokenizer.json": tokenizer,
        "config.json": _config(len(ids), pad, eos),
        # Qwen3's sampling defaults; the planted reply holds under them.
        "generation_config.json": {
            "bos_token_id": pad,
            "eos_token_id": [eos, pad],
            "pad_token_id": pad,
            "do_sample": True,
            "temperature": 0.6,
            "top_k": 20,
            "top_p": 0.95,
        },
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "model_max_length": CONTEXT,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "split_special_tokens": False,
            "chat_template": QWEN3_CHAT_TEMPLATE,
        },
        "special_tokens_map.json": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    }
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, indent=1, ensure_ascii=False) + "\n")


def ensure_tiny_qwen3(dest: Path) -> Path:
    """Return ``dest`` holding the tiny Qwen3 folder, building it on first use (a second or two)."""

    def build(work: Path, out: Path) -> None:
        out.mkdir()
        write_model(out)

    return build_once(dest, BUILD_VERSION, build)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} DEST_DIR", file=sys.stderr)
        return 2
    print(ensure_tiny_qwen3(Path(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
