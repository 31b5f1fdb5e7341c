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
Needs numpy, tokenizers and safetensors (all installed with vLLM); no network.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from flushgate.engine.qwen3_chat_template import QWEN3_CHAT_TEMPLATE

MARKER_NAME = ".flushgate-model-ready"
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


def _byte_level(text: str, alphabet: dict[int, str]) -> str:
    return "".join(alphabet[b] for b in text.encode())


def build_tokenizer() -> Any:
    """A byte-level BPE with whole-word merges for a small word list, plus Qwen3's added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = bytes_to_unicode()
    vocab: dict[str, int] = {}
    for b in range(256):
        vocab[alphabet[b]] = b
    merges: list[tuple[str, str]] = []

    def add_word(spelled: str) -> None:
        for i in range(1, len(spelled)):
            left, right = spelled[:i], spelled[i]
            if (left, right) not in seen:
                seen.add((left, right))
                merges.append((left, right))
            if spelled[: i + 1] not in vocab:
                vocab[spelled[: i + 1]] = len(vocab)

    seen: set[tuple[str, str]] = set()
    # The planted words first: their merges rank lowest, so they always come out as single tokens.
    for word in ("Thinking", "Hello", "\n\n"):
        add_word(_byte_level(word, alphabet))
    for word in WORDS:
        add_word(_byte_level(word, alphabet))
        add_word(_byte_level(" " + word, alphabet))
        add_word(_byte_level(" " + word.capitalize(), alphabet))

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in PLAIN_ADDED_TOKENS])
    for token, following in PLANTED_CHAIN:
        for name in (token, following):
            if tokenizer.token_to_id(name) is None:
                raise AssertionError(f"planted token {name!r} is not a single token")
    return tokenizer


def build_weights(token_ids: dict[str, int], vocab_size: int) -> dict[str, np.ndarray]:
    """Random Qwen3 weights, plus the planted chain in the embeddings and the output head."""
    rng = np.random.RandomState(SEED)
    chain_inputs = [token_ids[token] for token, _ in PLANTED_CHAIN]
    planted_dims = len(chain_inputs)
    scale = 4.0  # logit margin of a planted step: scale * sqrt(HIDDEN), about 45

    def random(*shape: int, std: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    embed = rng.standard_normal((vocab_size, HIDDEN)).astype(np.float32)
    embed[:, :planted_dims] = 0.0  # the first dimensions belong to the planted tokens alone
    head = random(vocab_size, HIDDEN, std=0.2)
    head[:, :planted_dims] = 0.0
    for dim, (token, following) in enumerate(PLANTED_CHAIN):
        embed[token_ids[token]] = 0.0
        embed[token_ids[token], dim] = np.sqrt(HIDDEN)  # same RMS as the random rows
        head[token_ids[following]] = 0.0
        head[token_ids[following], dim] = scale

    weights = {"model.embed_tokens.weight": embed, "lm_head.weight": head, "model.norm.weight": _ones(HIDDEN)}
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        weights |= {
            p + "input_layernorm.weight": _ones(HIDDEN),
            p + "post_attention_layernorm.weight": _ones(HIDDEN),
            p + "self_attn.q_proj.weight": random(q, HIDDEN),
            p + "self_attn.k_proj.weight": random(kv, HIDDEN),
            p + "self_attn.v_proj.weight": random(kv, HIDDEN),
            p + "self_attn.o_proj.weight": random(HIDDEN, q),
            p + "self_attn.q_norm.weight": _ones(HEAD_DIM),
            p + "self_attn.k_norm.weight": _ones(HEAD_DIM),
            p + "mlp.gate_proj.weight": random(INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": random(INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": random(HIDDEN, INTERMEDIATE),
        }
    return weights


def _ones(n: int) -> np.ndarray:
    return np.ones(n, dtype=np.float32)


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
    from safetensors.numpy import save_file

    tokenizer = build_tokenizer()
    tokenizer.save(str(out / "tokenizer.json"))
    token_ids: dict[str, int] = tokenizer.get_vocab(with_added_tokens=True)
    vocab_size = len(token_ids)
    pad, eos = token_ids["<|endoftext|>"], token_ids["<|im_end|>"]
    save_file(build_weights(token_ids, vocab_size), str(out / "model.safetensors"), metadata={"format": "pt"})
    files: dict[str, Any] = {
        "config.json": _config(vocab_size, pad, eos),
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
        (out / name).write_text(json.dumps(content, indent=1, sort_keys=True) + "\n")


def is_ready(dest: Path) -> bool:
    marker = dest / MARKER_NAME
    return marker.is_file() and marker.read_text().strip() == BUILD_VERSION


def ensure_tiny_qwen3(dest: Path) -> Path:
    """Return ``dest`` holding the tiny Qwen3 folder, building it on first use (about a second).

    The build goes to a temporary folder next to ``dest``, gets its marker last and is renamed into place under a
    lock file, so concurrent callers and interrupted builds never see a half-written folder.
    """
    dest = dest.resolve()
    if is_ready(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with (dest.parent / f".{dest.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_ready(dest):
            return dest
        with tempfile.TemporaryDirectory(prefix=f".{dest.name}.", dir=dest.parent) as tmp:
            build = Path(tmp) / "build"
            build.mkdir()
            write_model(build)
            (build / MARKER_NAME).write_text(BUILD_VERSION + "\n")
            if dest.exists():  # an older or unfinished build
                shutil.rmtree(dest)
            os.rename(build, dest)
    return dest


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} DEST_DIR", file=sys.stderr)
        return 2
    print(ensure_tiny_qwen3(Path(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
