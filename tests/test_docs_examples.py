"""The stage pages' "Your own data" examples work as written: every ```yaml block in docs/*.md whose first line is
`# my-….yaml — mmctl STAGE my-….yaml` passes `mmctl validate` in a directory holding the inputs it names — made
here from a fixed table keyed by those paths, never from what the recipe says, so a misspelled or missing field
and a path the table does not hold both fail — and every data line the pages show is read by the stage's own
reader (`mmctl validate` checks that an input exists, not what it holds)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from tests.cli import mmctl

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = ("tokenize", "pretrain", "sft", "rl", "align-vision", "quantize", "eval")
SECTION = "## Your own data"
FIRST_LINE = re.compile(r"# (my-[\w-]+\.yaml) — mmctl ([\w-]+) \1")


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.M | re.S)


def examples() -> list[tuple[str, str, str]]:
    """(page, file name, recipe text) of every ```yaml block of docs/*.md whose first line starts with `# my-`."""
    found = []
    for page in sorted(DOCS.glob("*.md")):
        for block in blocks(page.read_text(encoding="utf-8"), "yaml"):
            first = block.splitlines()[0]
            if first.startswith("# my-"):
                found.append((page.stem, first.split()[1], block))
    return found


EXAMPLES = examples()

# The data files, a few realistic lines each, in every format the pages name.
CORPUS = [
    {"text": "Sourdough needs flour, water, salt and time. Mix the starter into the flour the night before."},
    {"text": "A loaf is done when it sounds hollow as you tap its base, after about forty minutes at 220 °C."},
    {"text": "Rye flour holds little gluten: a rye dough is sticky and rises less than a wheat dough."},
    {"text": "Let bread cool for an hour before cutting it; the crumb is still setting as the steam leaves."},
]
CHATS = [
    {"messages": [{"role": "user", "content": "How long should bread dough rise?"},
                  {"role": "assistant", "content": "About an hour at room temperature, until it has doubled."}]},
    {"messages": [{"role": "system", "content": "You are a baker."},
                  {"role": "user", "content": "Why did my loaf come out flat?"},
                  {"role": "assistant", "content": "It rose too long or the dough was too wet."}]},
    {"prompt": "What does salt do in bread?", "completion": "It tightens the gluten and slows the yeast."},
    {"instruction": "Convert to grams.", "input": "2 cups of flour", "output": "About 250 g."},
]
PAIRS = [
    {"prompt": "How hot should the oven be for a loaf?", "chosen": "About 220 °C, with steam at first.",
     "rejected": "Bread bakes best in a cold oven."},
    {"prompt": [{"role": "user", "content": "When is a loaf done?"}],
     "chosen": [{"role": "assistant", "content": "When its base sounds hollow as you tap it."}],
     "rejected": [{"role": "assistant", "content": "After five minutes."}]},
]
PROBLEMS = [
    {"prompt": "A loaf takes 500 g of flour. How many grams do 3 loaves take?", "answer": 1500},
    {"messages": [{"role": "user", "content": "A tray holds 12 rolls. How many rolls are on 4 trays?"}],
     "answer": "48"},
    {"question": "A baker sells 30 loaves a day. How many in a week?", "answer": "30 * 7 = 210\n#### 210"},
]
VQA = [
    {"image": "images/0001.png", "question": "How many loaves are on the tray?", "answer": "3", "type": "count"},
    {"image": "images/0002.png", "question": "What colour is the crust?", "answer": "brown", "type": "colour"},
    {"image": "images/0003.png", "caption": "A round loaf on a wooden board."},
]
QA = [
    {"prompt": "Question: A loaf takes 500 g of flour. How many grams do 2 loaves take?\nAnswer:",
     "question": "A loaf takes 500 g of flour. How many grams do 2 loaves take?", "answer": 1000},
    {"prompt": "Question: A tray holds 12 rolls. How many rolls are on 3 trays?\nAnswer:", "answer": "36"},
]
MC = [
    {"context": "Bread dough rises because of the", "choices": ["yeast", "salt", "oven", "flour"], "answer": 0},
    {"context": "A loaf is done when its base sounds", "choices": ["wet", "hollow", "loud"], "answer": 1},
]


def jsonl(lines: list[dict]):
    def make(path: Path, fixtures: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    return make


def images(path: Path, lines: list[dict]) -> None:
    """A small PNG at every `image` path of `lines`, relative to the JSONL file at `path`."""
    from PIL import Image

    for i, line in enumerate(lines):
        if "image" in line:
            (path.parent / line["image"]).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (48, 48), (40 * i % 256, 120, 200)).save(path.parent / line["image"])


def image_questions(path: Path, fixtures: dict) -> None:
    jsonl(VQA)(path, fixtures)
    images(path, VQA)


def copy_of(fixture: str):
    def make(path: Path, fixtures: dict) -> None:
        shutil.copytree(fixtures[fixture], path)
    return make


# Every input an example may name (relative to where `mmctl` runs) → how this test makes it.
INPUTS = {
    "data/corpus.jsonl": jsonl(CORPUS),
    "data/chats.jsonl": jsonl(CHATS),
    "data/pairs.jsonl": jsonl(PAIRS),
    "data/problems.jsonl": jsonl(PROBLEMS),
    "data/vqa.jsonl": image_questions,
    "data/qa.jsonl": jsonl(QA),
    "data/mc.jsonl": jsonl(MC),
    "out/my-tokenize": copy_of("tokenized"),
    "out/my-pretrain/model": copy_of("checkpoint"),
    "out/my-sft/model": copy_of("chat_checkpoint"),
    "out/my-dpo/model": copy_of("chat_checkpoint"),
    "out/my-grpo/model": copy_of("chat_checkpoint"),
}
# Each example → the inputs made for it (and nothing else).
NEEDS = {
    "my-tokenize.yaml": ("data/corpus.jsonl",),
    "my-pretrain.yaml": ("out/my-tokenize",),
    "my-sft.yaml": ("out/my-pretrain/model", "data/chats.jsonl", "out/my-tokenize"),
    "my-dpo.yaml": ("out/my-sft/model", "data/pairs.jsonl"),
    "my-grpo.yaml": ("out/my-sft/model", "data/problems.jsonl"),
    "my-align-vision.yaml": ("out/my-sft/model", "data/vqa.jsonl"),
    "my-quantize.yaml": ("out/my-pretrain/model", "out/my-tokenize"),
    "my-eval.yaml": ("out/my-pretrain/model", "out/my-sft/model", "out/my-dpo/model", "out/my-grpo/model",
                     "data/qa.jsonl", "data/mc.jsonl", "out/my-tokenize"),
}


def read(kind: str, path: Path) -> list:
    """The items the stage reads from data file `path` of `kind` (a DataError if it cannot)."""
    if kind == "corpus":
        from mmctl.data.sources import TextSource
        from mmctl.data.sources import read as documents

        return list(documents(TextSource(kind="jsonl", path=str(path)), 0))
    if kind == "chats":
        from mmctl.data.sft import read_conversations

        return read_conversations(path)
    if kind in ("pairs", "problems"):
        from mmctl.data import rl

        return rl.read_pairs(path) if kind == "pairs" else rl.read_problems(path)
    if kind == "vqa":
        from mmctl.data.vqa import read_jsonl

        return read_jsonl(path, 48)
    from mmctl.evals.tasks import TaskConfig, items_of

    return items_of(TaskConfig(kind={"qa": "generation", "mc": "multiple_choice"}[kind], data=str(path)))


DATA = {"data/corpus.jsonl": ("corpus", CORPUS), "data/chats.jsonl": ("chats", CHATS),
        "data/pairs.jsonl": ("pairs", PAIRS), "data/problems.jsonl": ("problems", PROBLEMS),
        "data/vqa.jsonl": ("vqa", VQA), "data/qa.jsonl": ("qa", QA), "data/mc.jsonl": ("mc", MC)}
# what each page's data lines are (the pretrain and quantize pages show the corpus their tokenize output came from)
PAGE_DATA = {"tokenize": ("corpus",), "pretrain": ("corpus",), "quantize": ("corpus",), "sft": ("chats",),
             "rl": ("pairs", "problems"), "align-vision": ("vqa",), "eval": ("qa", "mc")}


@pytest.fixture(scope="session")
def tokenized(tmp_path_factory):
    """A finished `mmctl tokenize` output (tokenizer/, shards/, manifest.json) of a few built-in stories."""
    from mmctl import recipe
    from mmctl.stages import tokenize

    out = tmp_path_factory.mktemp("docs") / "tokenize"
    data = {"run": {"out": str(out)}, "data": {"sources": [{"kind": "stories", "documents": 100}]},
            "tokenizer": {"vocab_size": 320}}
    tokenize.run(recipe.build(tokenize.TokenizeRecipe, data, recipe.Source("t", {}, set())))
    return out


def strings(value) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [value] if isinstance(value, str) else []


def test_every_stage_page_has_an_example():
    pages = [page for page, _, _ in EXAMPLES]
    assert set(PAGES) <= set(pages), f"no `# my-` example on: {sorted(set(PAGES) - set(pages))}"
    assert pages.count("rl") >= 2  # DPO pairs and GRPO problems
    names = [name for _, name, _ in EXAMPLES]
    assert len(set(names)) == len(names), names


def test_every_example_is_in_the_table():
    """Each example is matched to the table, names in its first line the command that runs it, writes into its
    own `out/<name>`, is shown with `mmctl validate` and its run command, and reads exactly the inputs the table
    makes for it — the outputs of the other examples, or files under data/."""
    assert {name for _, name, _ in EXAMPLES} == set(NEEDS)
    assert {p for needs in NEEDS.values() for p in needs} == set(INPUTS)
    outs = {}
    for page, name, text in EXAMPLES:
        data = yaml.safe_load(text)
        first = FIRST_LINE.fullmatch(text.splitlines()[0])
        assert first and first.group(2) == data["stage"], f"{name}: first line {text.splitlines()[0]!r}"
        section = (DOCS / f"{page}.md").read_text(encoding="utf-8").split(SECTION, 1)[1]
        for command in (f"mmctl validate {name}", f"mmctl {data['stage']} {name}"):
            assert command in section, f"docs/{page}.md does not show `{command}`"
        assert data["run"]["out"] == f"out/{name.removesuffix('.yaml')}", name
        outs[name] = data["run"]["out"]
        paths = [s for s in strings({k: v for k, v in data.items() if k != "run"}) if s.startswith(("data/", "out/"))]
        for path in paths:
            assert any(path == p or path.startswith(p + "/") for p in NEEDS[name]), f"{name}: {path} not in NEEDS"
        for need in NEEDS[name]:
            assert any(path == need or path.startswith(need + "/") for path in paths), f"{name}: {need} unused"
    for path in INPUTS:  # the examples chain: what one reads from out/ is another's output
        assert path.startswith("data/") or any(path == o or path.startswith(o + "/") for o in outs.values()), path


@pytest.mark.parametrize(("page", "name", "text"), EXAMPLES, ids=[name for _, name, _ in EXAMPLES])
def test_example_validates(page, name, text, tmp_path, checkpoint, chat_checkpoint, tokenized):
    fixtures = {"checkpoint": checkpoint, "chat_checkpoint": chat_checkpoint, "tokenized": tokenized}
    (tmp_path / name).write_text(text, encoding="utf-8")
    for path in NEEDS[name]:
        INPUTS[path](tmp_path / path, fixtures)
    out = mmctl("validate", name, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, f"docs/{page}.md: {name}:\n{out.stdout}{out.stderr}"


def test_the_data_lines_are_read_by_the_stages(tmp_path):
    """The lines each page shows, and the files the table makes, are what the stage's reader takes."""
    from mmctl.errors import MmctlError

    for path, (kind, lines) in DATA.items():
        INPUTS[path](tmp_path / path, {})
        assert len(read(kind, tmp_path / path)) == len(lines), path
    for page in PAGES:
        section = (DOCS / f"{page}.md").read_text(encoding="utf-8").split(SECTION, 1)[1]
        lines = [line for block in blocks(section, "jsonl") for line in block.splitlines() if line.strip()]
        assert lines, f"docs/{page}.md shows no data line"
        shown = set()
        for i, line in enumerate(lines):
            file = tmp_path / page / f"{i}.jsonl"
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(line + "\n", encoding="utf-8")
            images(file, [json.loads(line)])
            read_as = []
            for kind in PAGE_DATA[page]:
                try:
                    read(kind, file)
                except MmctlError:  # not this kind; the line must be one of the page's kinds
                    continue
                read_as.append(kind)
            assert read_as, f"docs/{page}.md: {line} is none of {PAGE_DATA[page]}"
            shown.update(read_as)
        assert shown == set(PAGE_DATA[page]), f"docs/{page}.md shows no line of {set(PAGE_DATA[page]) - shown}"
