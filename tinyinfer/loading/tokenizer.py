"""Tokenizer: text <-> token ids for a checkpoint.

Two formats cover the Llama family: SentencePiece `tokenizer.model` (Kudo & Richardson, 2018: Llama 1/2,
Mistral, TinyLlama) and Hugging Face `tokenizer.json` (Llama 3, DeepSeek, Qwen), read through the
`tokenizers` library; a GGUF file's vocabulary becomes an in-memory `tokenizers.Tokenizer`
(loading/gguf_tokenizer.py) wrapped the same way (`Tokenizer.from_gguf`). `tokenizer_config.json`,
when present, says whether to add BOS and names the BOS/EOS tokens. Streaming detokenization lives
with the rest of output processing (engine/output.py).

Special-token strings inside text (`<s>`, `<|im_start|>`) encode to their ids, as Hugging Face's
tokenizers do: a rendered chat template writes them as text. The chat template itself (`chat_template`
in tokenizer_config.json, chat_template.jinja beside it, or a GGUF file's metadata) is loaded here and
rendered by loading/chat.py.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

from tinyinfer.config.errors import CheckpointError

# The named special tokens a chat template sees as variables (Hugging Face's special_tokens_map).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                       "mask_token")


class _SentencePiece:
    def __init__(self, path: Path):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as err:
            raise ValueError(f"{path} is not a SentencePiece model ({err}); a tiktoken-style tokenizer.model"
                             " is not supported: give a directory with tokenizer.json") from err
        sp = self.sp
        self.specials = {sp.IdToPiece(i): i for i in range(sp.GetPieceSize())
                         if sp.IsControl(i) or sp.IsUnknown(i)}
        names = sorted(self.specials, key=len, reverse=True)          # longest match first
        self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    def encode(self, text: str) -> list[int]:
        if self._split is None:
            return self.sp.EncodeAsIds(text)
        # Special pieces written as text become their ids; the text between them is encoded piece by
        # piece, each with its own leading "▁" (what Hugging Face's converted Llama tokenizer does).
        ids: list[int] = []
        for part in self._split.split(text):
            if part in self.specials:
                ids.append(self.specials[part])
            elif part:
                ids += self.sp.EncodeAsIds(part)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            return self.sp.DecodeIds(ids)  # control tokens (BOS/EOS) decode to nothing
        # Control tokens shown as their pieces; the text between them decoded as usual.
        out, run = [], []
        for i in ids:
            if self.sp.IsControl(i):
                out += [self.sp.DecodeIds(run), self.sp.IdToPiece(i)]
                run = []
            else:
                run.append(i)
        return "".join(out + [self.sp.DecodeIds(run)])

    def size(self) -> int:
        return self.sp.GetPieceSize()

    def piece(self, token_id: int) -> str:
        return self.sp.IdToPiece(token_id)

    def piece_id(self, piece: str) -> int | None:
        i = self.sp.PieceToId(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.IdToPiece(i) else i

    def default_bos_eos(self) -> tuple[int | None, int | None]:
        bos, eos = self.sp.bos_id(), self.sp.eos_id()
        return (bos if bos >= 0 else None), (eos if eos >= 0 else None)

    def adds_bos(self, bos_id: int | None) -> bool:
        return bos_id is not None  # the Llama / Mistral convention for SentencePiece checkpoints

    def unk_piece(self) -> str | None:
        return self.sp.IdToPiece(self.sp.unk_id()) if self.sp.unk_id() >= 0 else None


class _HFTokenizers:
    def __init__(self, path: Path):
        try:
            import tokenizers
        except ImportError as err:
            raise ImportError(f"{path} needs the 'tokenizers' package: pip install -e . "
                              "(or pip install tokenizers)") from err
        try:
            self.tk = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises plain Exception for malformed JSON
            raise ValueError(f"cannot read {path} as a tokenizers tokenizer.json: {err}") from err

    @classmethod
    def wrap(cls, tk) -> "_HFTokenizers":
        """An in-memory tokenizers.Tokenizer (a GGUF file's vocabulary)."""
        backend = cls.__new__(cls)
        backend.tk = tk
        return backend

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def piece(self, token_id: int) -> str:
        return self.tk.id_to_token(token_id)

    def piece_id(self, piece: str) -> int | None:
        return self.tk.token_to_id(piece)

    def default_bos_eos(self) -> tuple[int | None, int | None]:
        return None, None  # tokenizer.json does not say which token is BOS; configs do

    def adds_bos(self, bos_id: int | None) -> bool:
        # The post-processor (e.g. Llama 3's TemplateProcessing) is where tokenizer.json adds BOS.
        with_special = self.tk.encode("a", add_special_tokens=True).ids
        plain = self.tk.encode("a", add_special_tokens=False).ids
        return bos_id is not None and len(with_special) > len(plain) and with_special[0] == bos_id

    def unk_piece(self) -> str | None:
        return None  # tokenizer.json names no unknown token outside its model; configs do


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:    # RecursionError: absurdly deep nesting
        raise ValueError(f"cannot read {path}: {err}; fix or remove the file") from err


def _token_content(value: object) -> str | None:
    # tokenizer_config.json spells a special token as a string or as an AddedToken dict.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_templates(root: Path, cfg: dict, cfg_path: Path) -> dict[str, str]:
    """The checkpoint's chat templates by name ("default" first): chat_template.jinja (+ the named
    files in additional_chat_templates/) wins over tokenizer_config.json's "chat_template", a string
    or a list of {"name", "template"} (Hugging Face's loading order)."""
    def read(path: Path) -> str:
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot read the chat template {path}: {err}; fix or remove it") from err

    found: dict[str, str] = {}
    if (root / "chat_template.jinja").is_file():
        found["default"] = read(root / "chat_template.jinja")
    extra = root / "additional_chat_templates"
    for path in sorted(extra.glob("*.jinja")) if extra.is_dir() else []:
        found[path.stem] = read(path)
    if found:
        return found
    value = cfg.get("chat_template")
    if value is None or isinstance(value, str):
        return {} if value is None else {"default": value}
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        return {t["name"]: t["template"] for t in value}
    raise ValueError(f"{cfg_path}: chat_template must be a string or a list of "
                     f"{{'name': ..., 'template': ...}} objects, got {type(value).__name__}; fix the file")


class Tokenizer:
    """Encode / decode for one checkpoint; `bos_id`, `eos_id` may be None when the files name none."""

    add_eos = False           # append EOS to encoded text (GGUF files that say so)

    def __init__(self, backend: _SentencePiece | _HFTokenizers, bos_id: int | None, eos_id: int | None,
                 add_bos: bool):
        self._backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos
        self.vocab_size = backend.size()
        # Chat: the default Jinja template (None: the checkpoint ships none), every named one, and the
        # special-token strings the template sees (bos_token, eos_token, ...). See loading/chat.py.
        self.chat_template: str | None = None
        self.chat_templates: dict[str, str] = {}
        self.special_tokens: dict[str, str] = {}

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load from a checkpoint directory (or a weights file, whose directory is used)."""
        root = Path(path)
        if not root.exists():
            raise FileNotFoundError(f"tokenizer: {root} does not exist; pass a checkpoint directory")
        if root.is_file():
            root = root.parent
        spm, hf = root / "tokenizer.model", root / "tokenizer.json"
        backend: _SentencePiece | _HFTokenizers
        if spm.is_file() and not hf.is_file():
            backend = _SentencePiece(spm)
        elif spm.is_file():
            try:  # both present: SentencePiece is the original; tokenizer.json is the fallback
                backend = _SentencePiece(spm)
            except ValueError:
                backend = _HFTokenizers(hf)
        elif hf.is_file():
            backend = _HFTokenizers(hf)
        else:
            raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in {root}: put the checkpoint's "
                                    "tokenizer files beside its weights")

        bos_id, eos_id = backend.default_bos_eos()
        cfg_path = root / "tokenizer_config.json"
        cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
        for key in ("bos_token", "eos_token"):
            name = _token_content(cfg.get(key))
            token_id = backend.piece_id(name) if name is not None else None
            if name is not None and token_id is None:
                raise ValueError(f"{cfg_path}: {key}={name!r} is not in the vocabulary; fix the config")
            if token_id is not None:
                bos_id, eos_id = (token_id, eos_id) if key == "bos_token" else (bos_id, token_id)
        # Without names, fall back to the model config's ids (tokenizer.json checkpoints such as Llama 3).
        for name in ("generation_config.json", "config.json"):
            if (bos_id is None or eos_id is None) and (root / name).is_file():
                model_cfg = _read_json(root / name)
                eos = model_cfg.get("eos_token_id")
                eos = eos[0] if isinstance(eos, list) and eos else eos
                bos_id = bos_id if bos_id is not None else model_cfg.get("bos_token_id")
                eos_id = eos_id if eos_id is not None else eos
        add_bos = cfg.get("add_bos_token")
        if not isinstance(add_bos, bool):
            add_bos = backend.adds_bos(bos_id)
        tok = cls(backend, bos_id, eos_id, add_bos and bos_id is not None)
        tok.chat_templates = _chat_templates(root, cfg, cfg_path)
        tok.chat_template = tok.chat_templates.get("default")
        names = {key: _token_content(cfg.get(key)) for key in SPECIAL_TOKEN_NAMES}
        for key, token_id in (("bos_token", bos_id), ("eos_token", eos_id)):
            if names[key] is None and token_id is not None:
                names[key] = backend.piece(token_id)
        names["unk_token"] = names["unk_token"] or backend.unk_piece()
        tok.special_tokens = {k: v for k, v in names.items() if v is not None}
        return tok

    @classmethod
    def from_gguf(cls, gguf_tokenizer) -> "Tokenizer":
        """Wrap a GGUF file's tokenizer (loading/gguf_tokenizer.GGUFTokenizer): its vocabulary, the
        BOS / EOS it names and adds, and its chat template."""
        g = gguf_tokenizer
        tok = cls(_HFTokenizers.wrap(g.tokenizer), g.bos_id, g.eos_id, g.add_bos)
        tok.add_eos = bool(g.add_eos and g.eos_id is not None)
        tok.chat_template = g.chat_template
        tok.chat_templates = {} if g.chat_template is None else {"default": g.chat_template}
        tok.special_tokens = {name: tok.id_to_piece(i) for name, i in
                              (("bos_token", g.bos_id), ("eos_token", g.eos_id), ("unk_token", g.unk_id))
                              if i is not None}
        return tok

    @classmethod
    def for_checkpoint(cls, files) -> "Tokenizer":
        """The tokenizer of a located checkpoint (loading/checkpoint.CheckpointFiles): from the GGUF
        file itself, else from the files in its directory."""
        if getattr(files, "gguf", None) is not None:
            from tinyinfer.loading.gguf import GGUFError
            try:
                return cls.from_gguf(files.gguf.tokenizer())
            except GGUFError as err:                # names the file and the key
                raise CheckpointError(str(err)) from None
        return cls.from_dir(files.tokenizer_dir)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; BOS first when `add_bos` (None: as the checkpoint says), EOS last
        when the checkpoint asks for it (GGUF add_eos_token)."""
        ids = self._backend.encode(text)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if self.add_eos:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens (BOS/EOS, chat markers) are dropped unless
        `skip_special_tokens` is False; ids past the vocabulary (padded heads) always are."""
        n = self.vocab_size
        return self._backend.decode([int(i) for i in ids if 0 <= int(i) < n], skip_special_tokens)

    def id_to_piece(self, token_id: int) -> str:
        return self._backend.piece(int(token_id))
