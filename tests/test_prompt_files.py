"""One prompt-file reader for every command: generation (``data.*.prompt_file``, ``generate --prompt-file``) and
evaluation (``eval.prompt_sets[].prompts_file``) read .txt, .csv (with or without a UTF-8 BOM), .yaml and .json
files the same way."""

from __future__ import annotations

import pytest

from metaunlearn.data.prompts import read_prompt_file as generation_prompts
from metaunlearn.errors import UserError
from metaunlearn.metrics.config import PromptSetConfig
from metaunlearn.metrics.evaluate import load_prompt_set

PROMPTS = ["a red triangle", "a picture of a red triangle, large"]
FILES = {
    "p.txt": "# forget prompts\na red triangle\n\na picture of a red triangle, large\n",
    "p.csv": 'prompt,evaluation_seed\na red triangle,3\n"a picture of a red triangle, large",4\n',
    "bom.csv": '\ufeffprompt,evaluation_seed\na red triangle,3\n"a picture of a red triangle, large",4\n',
    "upper.csv": 'Prompt,Evaluation_Seed\na red triangle,3\n"a picture of a red triangle, large",4\n',
    "p.yaml": "- a red triangle\n- a picture of a red triangle, large\n",
    "p.yml": "[a red triangle, 'a picture of a red triangle, large']\n",
    "p.json": '["a red triangle", "a picture of a red triangle, large"]',
}


def evaluation_prompts(path) -> list:
    spec = PromptSetConfig(name="forget", role="forget", concept="red_triangle", prompts_file=path.name)
    return load_prompt_set(spec, path.parent)


@pytest.mark.parametrize("name", FILES)
def test_generation_and_evaluation_read_a_prompt_file_alike(tmp_path, name):
    path = tmp_path / name
    path.write_text(FILES[name], encoding="utf-8")
    assert generation_prompts(path) == PROMPTS
    items = evaluation_prompts(path)
    assert [i.prompt for i in items] == PROMPTS
    assert [i.seed for i in items] == ([3, 4] if name.endswith(".csv") else [None, None])


@pytest.mark.parametrize(
    "content, message",
    [
        ("prompt,evaluation_seed\na,x\n", "prompt 1: evaluation_seed/evaluation_guidance must be numbers"),
        ("prompt,evaluation_seed\na,inf\n", "prompt 1: evaluation_seed/evaluation_guidance must be numbers"),
        ("prompt,evaluation_guidance\na,1\nb,nan\n", "prompt 2: evaluation_seed/evaluation_guidance must be finite"),
        ("text\nhello\n", "has no 'prompt' column"),
        ("prompt\n\n", "contains no prompts"),
    ],
)
def test_bad_evaluation_prompt_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        evaluation_prompts(path)
