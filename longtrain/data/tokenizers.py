"""Tokenizers for the loader: built-in byte-level, a `tokenizers` JSON file, or a Hugging Face tokenizer folder.

Every tokenizer has `encode(text) -> list[int]` (no special tokens), `vocab_size`, and `bos_id` / `eos_id`
(None when it has none; asking the loader to add a missing one is an error that names the config key).
`make_tokenizer(spec)` picks one from `data.tokenizer`: "byte", a path to a `.json` file, or a folder.
"""
from __future__ import annotations

import os


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 (vocab 256, no files). BOS = 0x02 (STX) and EOS = 0x03 (ETX): control bytes that
    text does not contain, so the vocabulary stays 256 and matches a 256-entry embedding."""

    vocab_size = 256
    bos_id = 0x02
    eos_id = 0x03
    name = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class JsonFileTokenizer:
    """A `tokenizers` library JSON file (`tokenizer.json`). BOS/EOS come from `bos_token` / `eos_token`."""

    def __init__(self, path: str, *, bos_token: str | None = None, eos_token: str | None = None):
        import tokenizers

        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the library raises a bare Exception with the parse error
            raise ValueError(f"data.tokenizer: cannot load tokenizers JSON file {path!r}: {e}") from e
        self.name = path
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._token_id(bos_token, "data.bos_token")
        self.eos_id = self._token_id(eos_token, "data.eos_token")

    def _token_id(self, token: str | None, key: str) -> int | None:
        if token is None:
            return None
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise ValueError(f"{key}={token!r} is not in the vocabulary of {self.name!r}")
        return tid

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


class HFTokenizer:
    """A Hugging Face tokenizer folder on disk (`transformers.AutoTokenizer`, local files only, never downloads)."""

    def __init__(self, path: str, *, bos_token: str | None = None, eos_token: str | None = None):
        import transformers

        try:
            self._tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # OSError / ValueError depending on what is missing in the folder
            raise ValueError(f"data.tokenizer: cannot load a Hugging Face tokenizer from folder {path!r}: {e}") from e
        self.name = path
        self.vocab_size = len(self._tok)
        self.bos_id = self._resolve(bos_token, self._tok.bos_token_id, "data.bos_token")
        self.eos_id = self._resolve(eos_token, self._tok.eos_token_id, "data.eos_token")

    def _resolve(self, token: str | None, default: int | None, key: str) -> int | None:
        if token is None:
            return default
        tid = self._tok.convert_tokens_to_ids(token)
        if tid is None or tid == self._tok.unk_token_id and token != self._tok.unk_token:
            raise ValueError(f"{key}={token!r} is not in the vocabulary of {self.name!r}")
        return tid

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def make_tokenizer(spec: str, *, bos_token: str | None = None, eos_token: str | None = None):
    """`spec`: "byte", a `tokenizers` JSON file, or a Hugging Face tokenizer folder."""
    if spec == "byte":
        if bos_token is not None or eos_token is not None:
            raise ValueError("data.bos_token / data.eos_token cannot be set with data.tokenizer='byte' "
                             f"(it uses BOS={ByteTokenizer.bos_id}, EOS={ByteTokenizer.eos_id})")
        return ByteTokenizer()
    if os.path.isdir(spec):
        return HFTokenizer(spec, bos_token=bos_token, eos_token=eos_token)
    if os.path.isfile(spec):
        if not spec.endswith(".json"):
            raise ValueError(f"data.tokenizer={spec!r}: a file must be a tokenizers JSON file (*.json)")
        return JsonFileTokenizer(spec, bos_token=bos_token, eos_token=eos_token)
    raise ValueError(f"data.tokenizer={spec!r} is neither 'byte', an existing .json file, nor a tokenizer folder")
