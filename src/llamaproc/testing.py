"""Tiny GGUF models for tests, benchmarks and the demo.

``write_tiny_model(path)`` writes a small llama-architecture GGUF with random
weights and a SentencePiece-style vocabulary that llama-server loads in a few
tens of milliseconds on a CPU. Its output is gibberish, but it is
deterministic: with greedy sampling the same prompt always yields the same
tokens, which is what tests need.

The vocabulary follows the rules llama.cpp's SPM tokenizer relies on:

* all 256 byte tokens ``<0x00>`` .. ``<0xFF>`` exist, so any character can be
  tokenized (a missing byte token aborts the request);
* no two tokens share a string (duplicates crash the loader);
* the output rows of the byte tokens and of the control tokens are zero, so
  greedy decoding emits whole-word pieces only and never an invalid UTF-8
  sequence or an early end-of-sequence.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["write_tiny_model"]

# Pieces with the SentencePiece word-boundary marker, so prompts made of
# ordinary words tokenize into whole pieces.
_WORDS = (
    "the a an and or of to in on for with is are was be it this that as at by "
    "from hello world model token stream llama server process test chat user "
    "assistant system say hi yes no one two three four five six seven eight "
    "nine ten red green blue cat dog fish bird tree sun moon star sky sea"
).split()

_CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _vocab() -> tuple[list[str], list[int], list[float]]:
    from gguf import TokenType

    tokens: list[str] = ["<unk>", "<s>", "</s>"]
    types: list[int] = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    for byte in range(256):
        tokens.append(f"<0x{byte:02X}>")
        types.append(TokenType.BYTE)
    pieces: list[str] = ["\u2581"]
    pieces += [chr(c) for c in range(0x21, 0x7F)]
    pieces += ["\u2581" + w for w in _WORDS]
    pieces += list(dict.fromkeys(w for w in _WORDS if len(w) > 1))
    seen = set(tokens)
    for piece in pieces:
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
            types.append(TokenType.NORMAL)
    # Longer pieces score higher, so the tokenizer prefers whole words.
    scores = [0.0 if t != TokenType.NORMAL else -100.0 + len(tok) for tok, t in zip(tokens, types, strict=False)]
    return tokens, types, scores


def write_tiny_model(
    path: str | os.PathLike[str],
    *,
    n_layers: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_ff: int = 128,
    context_length: int = 2048,
    seed: int = 0,
    pooling: str | None = None,
) -> Path:
    """Write a tiny llama GGUF to *path* and return the path.

    *pooling* (``"mean"``, ``"cls"``, ``"last"`` or ``None``) sets
    ``llama.pooling_type``; by default the file names none, like most
    generative models.
    """
    import numpy as np
    from gguf import GGUFWriter, LlamaFileType, PoolingType

    target = Path(path)
    tokens, types, scores = _vocab()
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        values: np.ndarray = (rng.standard_normal(shape) * 2.0 / np.sqrt(shape[-1])).astype(np.float32)
        return values

    writer = GGUFWriter(str(target), "llama")
    writer.add_name("llamaproc-tiny")
    writer.add_file_type(LlamaFileType.ALL_F32)
    writer.add_context_length(context_length)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    if pooling is not None:
        writer.add_pooling_type(PoolingType[pooling.upper()])

    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_chat_template(_CHATML)

    output = weight(n_vocab, n_embd)
    output[[i for i, t in enumerate(types) if t != 1]] = 0.0  # 1 == TokenType.NORMAL

    writer.add_tensor("token_embd.weight", weight(n_vocab, n_embd))
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    writer.add_tensor("output.weight", output)
    for i in range(n_layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(n_embd, n_ff))

    target.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target
