"""The trainer tests' fixtures (tiny local models, the keyword task), shared with the GPU tests.

Re-exported by name: pytest finds a fixture in the conftest of the test's own directory or above, and
tests/trainer is a sibling, not a parent.
"""

from tests.trainer.conftest import (
    keyword_task,
    keyword_task_rows,
    single_threaded_torch,
    tiny_deepseek_dir,
    tiny_llama_dir,
    tiny_model_dirs,
)

__all__ = [
    "keyword_task",
    "keyword_task_rows",
    "single_threaded_torch",
    "tiny_deepseek_dir",
    "tiny_llama_dir",
    "tiny_model_dirs",
]
