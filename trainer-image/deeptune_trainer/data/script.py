"""Telling Chinese text from English: punctuation rules and augmentation templates depend on it."""

from __future__ import annotations

import re

CJK_RANGES = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff"
"""Han ideographs (with extensions and compatibility forms) and kana."""

_CJK = re.compile(f"[{CJK_RANGES}]")
_LATIN_WORD = re.compile(r"[A-Za-z]+")


def is_cjk(char: str) -> bool:
    return bool(char) and _CJK.match(char) is not None


def is_chinese(text: str) -> bool:
    """Whether CJK is the dominant script. One Han character carries about a word, so Han characters
    are weighed against Latin *words*: "用 PyTorch 训练模型" is Chinese, "the word 你好" is English."""
    if _CJK.search(text) is None:
        return False
    if _LATIN_WORD.search(text) is None:  # counting needs both (most lines hold one script)
        return True
    return len(_CJK.findall(text)) >= len(_LATIN_WORD.findall(text))
