"""CLIP's tokenizer (model.tokenizer): the same ids as open_clip's SimpleTokenizer (CLIP's
reference one) over a corpus of awkward texts, the one deliberate difference (special-token
texts inside a prompt), and files that are not the vocabulary refused in one sentence."""

from __future__ import annotations

import gzip
import os

import pytest
import torch
from dinotxt_files import clip_vocabulary, reference_tokenizer

from model.errors import WeightsError
from model.tokenizer import CONTEXT, ClipTokenizer, clean

START, END = 49406, 49407

CORPUS = [
    # plain prompts and punctuation
    "a photo of a cat.",
    "itap of a dog.",
    "a bad photo of the traffic light!",
    "hello!!! ??? ... --- (brackets) [square] {curly} @user #tag $5 100% a/b a\\b a_b a-b",
    "semi;colon: comma, period. quote\"s 'single' `back`",
    # contractions
    "I'm you're they'll we've he'd it's don't can't",
    "I'M YOU'RE THEY'LL",
    "rock'n'roll o'clock l'été",
    # upper case
    "HELLO World",
    "A PHOTO OF THE LARGE CHEST OF DRAWERS.",
    # accented Latin
    "café naïve résumé Ångström façade jalapeño Straße",
    "Ærøskøbing Łódź Čeština",
    # CJK and other scripts
    "東京タワー 北京 서울",
    "一只猫的照片",
    "Привет мир",
    "مرحبا بالعالم",
    # emoji
    "🐶🍕👍🏽",
    "a photo of a 🐱 on a 🛋️",
    "👨‍👩‍👧‍👦 family",
    # HTML entities, single and double escaped
    "&lt;i&gt;italic&lt;/i&gt;",
    "&amp;lt;b&amp;gt; bold",
    "&amp; &quot;quoted&quot; &#39;apos&#39; &nbsp;space",
    "fish &amp;amp; chips",
    # mojibake ftfy fixes
    "schÃ¶n",
    "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.",
    "cafÃ©",
    # whitespace
    "a\tb\n\nc   d",
    "   leading and trailing   ",
    "\n\t\r\n",
    "line one\r\nline two\u00a0nbsp\u2003em-space",
    # numbers
    "3.14159 1,000,000 2024 0x1F 1e-5 ½ ² ٣",
    "room 101, floor 7",
    # long texts: cut to 77 with the end token last
    " ".join(["word"] * 300),
    " ".join(f"token{i}" for i in range(100)),
    "x" * 500,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    # empty
    "",
    " ",
]


@pytest.fixture(scope="module")
def ours() -> ClipTokenizer:
    return ClipTokenizer(clip_vocabulary())


@pytest.fixture(scope="module")
def reference():
    return reference_tokenizer()


def one_line(message: str) -> bool:
    return "\n" not in message and message.endswith(".")


def test_the_same_ids_as_open_clip_over_the_corpus(ours, reference):
    expected = reference(CORPUS, context_length=CONTEXT)
    got = ours(CORPUS)
    assert got.shape == expected.shape == (len(CORPUS), CONTEXT)
    assert got.dtype == torch.long
    for text, a, b in zip(CORPUS, got, expected, strict=True):
        assert a.tolist() == b.tolist(), f"{text[:40]!r}: ours {a[:16].tolist()} vs open_clip {b[:16].tolist()}"
    assert ours.vocab_size == 49408 and ours.start == START and ours.end == END


def test_each_text_alone_gives_the_same_ids_as_in_a_batch(ours):
    batch = ours(CORPUS)
    for i, text in enumerate(CORPUS):
        assert ours(text)[0].tolist() == batch[i].tolist()


def test_encode_is_the_ids_between_start_and_end(ours, reference):
    for text in ["a photo of a cat.", "東京タワー", "&amp;lt;b&amp;gt;", "I'm"]:
        ids = ours.encode(text)
        assert ids == reference.encode(text)
        row = ours(text)[0].tolist()
        assert row[: len(ids) + 2] == [START, *ids, END]
        assert all(v == 0 for v in row[len(ids) + 2 :])


def test_a_long_text_is_cut_to_the_context_and_ends_with_the_end_token(ours, reference):
    text = " ".join(["word"] * 300)
    row = ours(text)[0]
    assert row.shape == (CONTEXT,)
    assert row[0] == START and row[-1] == END
    assert (row[1:-1] != 0).all() and (row[1:-1] != END).all()  # no padding, no early end
    assert row.tolist() == reference(text, context_length=CONTEXT)[0].tolist()
    assert row.argmax() == CONTEXT - 1  # the text tower pools here
    # another context length cuts at that length
    short = ours(text, context=16)[0]
    assert short.shape == (16,) and short[-1] == END and short[:15].tolist() == row[:15].tolist()


def test_empty_text_is_start_and_end(ours):
    assert ours("")[0, :3].tolist() == [START, END, 0]
    assert ours("   \n\t")[0, :3].tolist() == [START, END, 0]
    assert ours([]).shape == (0, CONTEXT)


def test_cleaning_unescapes_twice_fixes_mojibake_folds_space_and_lowers(ours):
    assert clean("&amp;lt;B&amp;gt;") == "<b>"
    assert clean("schÃ¶n") == "schön"
    assert clean("  A\t\tB \n C  ") == "a b c"
    assert ours("schÃ¶n").tolist() == ours("schön").tolist()
    assert ours("&amp;lt;b&amp;gt;").tolist() == ours("<b>").tolist()
    assert ours("A  PHOTO\tOF\na CAT").tolist() == ours("a photo of a cat").tolist()


def test_the_end_of_text_marker_inside_a_prompt_is_the_end_token(ours, reference):
    """A deliberate difference from open_clip 3.x (which splits the marker into characters):
    ours maps it to the end token, as Meta's and OpenAI's tokenizers do."""
    row = ours("<|endoftext|> hi")[0].tolist()
    hi = ours.encode("hi")
    assert row[: 3 + len(hi)] == [START, END, *hi, END]
    assert row.index(END) == 1  # the text tower pools at the first end token
    ref = reference("<|endoftext|> hi", context_length=CONTEXT)[0].tolist()
    assert ref[1] != END  # open_clip splits it: the reason it is left out of the corpus above
    middle = ours("a photo <|endoftext|> of")[0].tolist()
    assert middle[: len(ours.encode("a photo")) + 2] == [START, *ours.encode("a photo"), END]


# ---- files that are not the vocabulary ---------------------------------------------------------


def assert_refused(path, *words):
    with pytest.raises(WeightsError) as e:
        ClipTokenizer(path)
    message = str(e.value)
    assert one_line(message), message
    assert str(path) in message and "vocabulary" in message
    for word in words:
        assert word in message, message


def test_a_file_that_is_not_gzip_is_refused(tmp_path):
    path = tmp_path / "vocab.txt.gz"
    path.write_bytes(os.urandom(4096))
    assert_refused(path)


def test_random_bytes_gzipped_are_refused(tmp_path):
    path = tmp_path / "random.gz"
    path.write_bytes(gzip.compress(os.urandom(1 << 16)))
    assert_refused(path)


def test_a_vocabulary_with_few_lines_is_refused(tmp_path):
    lines = clip_vocabulary().read_bytes()
    text = gzip.decompress(lines).decode().split("\n")[:1000]
    path = tmp_path / "short.txt.gz"
    path.write_bytes(gzip.compress("\n".join(text).encode()))
    assert_refused(path, "999 merge lines", "bpe_simple_vocab_16e6.txt.gz")


def test_a_vocabulary_cut_off_mid_stream_is_refused(tmp_path):
    data = clip_vocabulary().read_bytes()
    path = tmp_path / "cut.txt.gz"
    path.write_bytes(data[: len(data) // 2])
    assert_refused(path)


def test_lines_that_are_not_merges_are_refused(tmp_path):
    text = "header\n" + "\n".join(f"a b c{i}" for i in range(49000))
    path = tmp_path / "three.txt.gz"
    path.write_bytes(gzip.compress(text.encode()))
    assert_refused(path)


def test_a_missing_file_is_refused_with_its_name(tmp_path):
    assert_refused(tmp_path / "missing.txt.gz")
