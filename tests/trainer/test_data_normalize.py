"""Normalization: NFKC, punctuation by script (Chinese keeps Chinese marks), whitespace, case folding."""

from __future__ import annotations

import pytest

from deeptune.api.finetunejob import Normalization
from deeptune_trainer.data.normalize import collapse_whitespace, normalize_text, unify_punctuation
from deeptune_trainer.data.script import is_chinese

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
