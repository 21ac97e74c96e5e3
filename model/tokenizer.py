"""CLIP's tokenizer, which dino.txt's text tower reads: the same ids as CLIP's reference one.

Text is cleaned as CLIP cleans it (ftfy's fix_text, HTML entities unescaped twice, runs of
whitespace made one space, lower case), split by CLIP's pattern, mapped byte by byte to CLIP's
printable alphabet, then merged by byte-pair encoding with the merges of the vocabulary file
Meta ships (`thirdparty/bpe_simple_vocab_16e6.txt.gz`, CLIP's). The BPE itself is Hugging
Face's `tokenizers` (Rust, kept, fast), configured from that file: no merge loop of ours.
"""

from __future__ import annotations

import gzip
import html
from functools import lru_cache
from pathlib import Path

import torch

from .errors import WeightsError
from .storage import options_for

CONTEXT = 77
START, END = "<|startoftext|>", "<|endoftext|>"
MERGES = 49152 - 256 - 2  # merges CLIP takes from the file (its first line is a header)
# CLIP's pre-tokenizer: contractions, runs of letters, single digits, runs of other symbols
PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """CLIP's byte -> character map: printable Latin-1 bytes stand for themselves, the others
    for characters from U+0100 on, so no token holds whitespace or control characters. Its order
    (printable bytes first) is the order of the vocabulary's first 512 ids."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}  # in this order: the vocabulary's first ids follow it
    others = [b for b in range(256) if b not in chars]
    chars.update({b: chr(256 + i) for i, b in enumerate(others)})
    return chars


def clean(text: str) -> str:
    import ftfy
    import regex

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class ClipTokenizer:
    def __init__(self, vocab_file: str | Path, storage_options: dict | None = None):
        """`vocab_file`: a local path or any fsspec URL of CLIP's bpe_simple_vocab_16e6.txt.gz."""
        import fsspec
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers

        source = str(vocab_file)
        try:
            with fsspec.open(source, "rb", **options_for(str(source), storage_options)) as f:
                packed = f.read()
        except FileNotFoundError:
            raise WeightsError(f"The vocabulary {source} does not exist: check the path or URL.") from None
        except OSError as e:
            raise WeightsError(f"Cannot read the vocabulary {source} ({e}): check the URL and credentials.") from None
        try:
            lines = gzip.decompress(packed).decode("utf-8").split("\n")
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise WeightsError(f"{source} is not CLIP's BPE vocabulary (a .txt.gz of merges): {e}.") from None
        merges = [tuple(line.split()) for line in lines[1 : MERGES + 1]]
        if len(merges) != MERGES or any(len(m) != 2 for m in merges):
            raise WeightsError(
                f"{source} is not CLIP's BPE vocabulary ({len(merges)} merge lines, {MERGES} expected): "
                "use bpe_simple_vocab_16e6.txt.gz from Meta's hub."
            )
        alphabet = list(byte_alphabet().values())
        vocab = [*alphabet, *(c + "</w>" for c in alphabet), *("".join(m) for m in merges), START, END]
        self.ids = {token: i for i, token in enumerate(vocab)}
        self.start, self.end = self.ids[START], self.ids[END]
        bpe = Tokenizer(models.BPE(vocab=self.ids, merges=merges, end_of_word_suffix="</w>"))
        bpe.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        bpe.add_special_tokens([START, END])
        self._bpe = bpe

    @property
    def vocab_size(self) -> int:
        return len(self.ids)

    def encode(self, text: str) -> list[int]:
        """The BPE ids of `text`, without the start and end tokens."""
        return self._bpe.encode(clean(text), add_special_tokens=False).ids

    def __call__(self, texts: str | list[str], context: int = CONTEXT) -> torch.Tensor:
        """(N, context) int64: start, the text's ids, end, zeros; a text that does not fit is cut
        and ends with the end token, as CLIP's does."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.zeros(len(texts), context, dtype=torch.long)
        for i, encoding in enumerate(self._bpe.encode_batch([clean(t) for t in texts], add_special_tokens=False)):
            ids = [self.start, *encoding.ids, self.end]
            if len(ids) > context:
                ids = ids[:context]
                ids[-1] = self.end
            out[i, : len(ids)] = torch.tensor(ids)
        return out


__all__ = ["CONTEXT", "ClipTokenizer", "clean"]
