"""Normalization: NFKC, punctuation by script (Chinese keeps Chinese marks), whitespace, case folding."""

from __future__ import annotations

import random
import re
import sys
import unicodedata

import pytest

from deeptune.api.finetunejob import Normalization
from deeptune_trainer.data.normalize import (
    _ASCII_LINE_WORK,
    _CHINESE_LINE_WORK,
    NFKC_KEPT,
    _collapse,
    _comparison_table,
    _nfkc,
    _to_ascii,
    _to_chinese,
    collapse_whitespace,
    is_tidy,
    normalize_text,
    unify_punctuation,
)
from deeptune_trainer.data.script import CJK_RANGES, is_chinese

DEFAULT = Normalization()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Chinese keeps (or gets) full-width punctuation, without spaces around it.
        ("你好 , 世界!我用Python. 价格是3.5元.", "你好，世界！我用Python。价格是3.5元。"),
        ("您好，请问有什么可以帮您？", "您好，请问有什么可以帮您？"),
        ("时间：12:30，地点：北京。", "时间：12:30，地点：北京。"),
        ("然后...", "然后……"),
        ("(见下文)内容", "（见下文）内容"),
        ("使用 (Python 3.11 版本) 训练", "使用（Python 3.11 版本）训练"),
        # ...but not numbers, code or URLs inside a Chinese line.
        ('print("你好")', 'print("你好")'),
        ('printf("你好");', 'printf("你好");'),
        ("使用 print() 函数.", "使用 print() 函数。"),
        ("请打开网站https://a.com/x?q=1,然后登录", "请打开网站https://a.com/x?q=1，然后登录"),
        ("邮箱 zhang.san@example.com，谢谢", "邮箱 zhang.san@example.com，谢谢"),
        # English gets ASCII, with a space after a converted mark.
        ("Hello，world！How are you？", "Hello, world! How are you?"),
        ("He said “yes”（twice）.", 'He said "yes"(twice).'),
        # NFKC: full-width letters and digits, ideographic space.
        ("ＡＢＣ１２３ full\u3000width", "ABC123 full width"),
        ("ﬁne ①", "fine 1"),
    ],
)
def test_default_normalization(text: str, expected: str) -> None:
    assert normalize_text(text, DEFAULT) == expected


def test_zero_width_characters_are_removed() -> None:
    assert normalize_text("a\u200bb\u200c\u200dc\ufeffd\u2060e", DEFAULT) == "abcde"


def test_whitespace_collapses_but_keeps_indentation() -> None:
    text = "  def f(x):\r\n        return  x  \n\n\n\nend\t\t!  "
    assert collapse_whitespace(text) == "def f(x):\n        return x\n\nend !"


def test_case_folding_is_opt_in() -> None:
    assert normalize_text("Hello WORLD 你好", DEFAULT) == "Hello WORLD 你好"
    assert (
        normalize_text("Hello WORLD Straße 你好", Normalization(case_fold=True)) == "hello world strasse 你好"
    )


def test_each_step_can_be_turned_off() -> None:
    off = Normalization(unicode=False, punctuation=False, whitespace=False)
    assert normalize_text("ＡＢ，  x\u200b", off) == "ＡＢ，  x\u200b"
    # NFKC alone leaves Chinese punctuation to the punctuation rule.
    nfkc_only = Normalization(punctuation=False, whitespace=False)
    assert normalize_text("ＡＢ，Ｃ！", nfkc_only) == "AB，C！"


def test_punctuation_is_decided_per_line() -> None:
    assert (
        unify_punctuation("这是代码：\nx = f(a, b);\nDone，thanks.")
        == "这是代码：\nx = f(a, b);\nDone, thanks."
    )


@pytest.mark.parametrize(
    ("text", "chinese"),
    [
        ("用 PyTorch 训练模型", True),
        ("the word 你好 means hello", False),
        ("plain English", False),
        ("", False),
    ],
)
def test_dominant_script(text: str, chinese: bool) -> None:
    assert is_chinese(text) is chinese


# The quick checks below let most texts through untouched without running a rule; each must never
# say "nothing to change" where the rule would change something. Random texts from characters each
# rule reacts to, seeded so a run is repeatable.
TRICKY = list(
    " \t\n\r\u3000\u00a0\u200b\u2028\x0b\x85\x1f,.!?:;()…，。！？：；、（）“”【】～ABCabc123１２ＡＢ"
    "你好世界用éé\u0301ﬁ①㎡x₁²`~@#-_/\U00010100\U0001d173ß"
)


def _random_texts(seed: int, count: int = 20_000, longest: int = 24) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(TRICKY, k=rng.randint(0, longest))) for _ in range(count)]


def test_the_tidy_check_never_skips_whitespace_that_would_change() -> None:
    texts = [*_random_texts(1), "a b", "x\ny", "  indented", "a\n\nb", "中文 text"]
    tidy = [text for text in texts if is_tidy(text)]
    assert len(tidy) > 100  # the check does let texts through
    assert [_collapse(text) for text in tidy] == tidy


def test_the_punctuation_checks_never_skip_a_line_that_would_change() -> None:
    lines = [line for text in _random_texts(2) for line in text.split("\n")]
    skipped_chinese = [line for line in lines if not _CHINESE_LINE_WORK.search(line)]
    skipped_ascii = [line for line in lines if not _ASCII_LINE_WORK.search(line)]
    assert len(skipped_chinese) > 100 and len(skipped_ascii) > 100
    assert [_to_chinese(line) for line in skipped_chinese] == skipped_chinese
    assert [_to_ascii(line) for line in skipped_ascii] == skipped_ascii


def test_nfkc_skips_only_texts_it_would_not_change() -> None:
    # The whole-text check may skip the per-segment pass only because every kept mark is one NFKC
    # changes: a text holding one is never "already normalized".
    assert all(unicodedata.normalize("NFKC", mark) != mark for mark in NFKC_KEPT)
    for text in _random_texts(3):
        expected = "".join(
            part if part in NFKC_KEPT else unicodedata.normalize("NFKC", part)
            for part in re.split(f"([{NFKC_KEPT}])", text)
        )
        assert _nfkc(text) == expected, text


def test_the_script_check_counts_only_when_both_scripts_are_there() -> None:
    for text in [*_random_texts(4), "用 PyTorch 训练模型", "the word 你好 means hello"]:
        han = len(re.findall(f"[{CJK_RANGES}]", text))
        assert is_chinese(text) is (han > 0 and han >= len(re.findall("[A-Za-z]+", text))), text


def test_the_comparison_table_deletes_exactly_punctuation_separators_and_controls() -> None:
    table = _comparison_table()
    for code in range(sys.maxunicode + 1):
        category = unicodedata.category(chr(code))
        deleted = category[0] in "PZ" or category in ("Cc", "Cf")
        assert (table.get(code, code) is None) is deleted, hex(code)
        assert deleted or table.get(code, code) == code, hex(code)
