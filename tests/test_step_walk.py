"""docs/architecture.md's step walk against the code: a traced decode step (CPU, greedy and sampled
requests, the host sampler included) enters only files the walk lists, so the walk cannot drift."""
import re
import sys
from pathlib import Path

from tinyinfer import LLMEngine, SamplingParams

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "tinyinfer"
LLAMA = str(REPO / "models" / "shakespeare-llama")


def listed_files() -> set[str]:
    text = (REPO / "docs" / "architecture.md").read_text()
    section = text.split("\n## One engine step\n", 1)[1].split("\n## ", 1)[0]
    packages = "|".join(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    files = set(re.findall(rf"\b((?:{packages})/\w+\.py)\b", section))
    assert len(files) > 20, f"the step walk lists only {sorted(files)}"
    return files


def traced_decode_step_files() -> set[str]:
    engine = LLMEngine(LLAMA, device="cpu", cuda_graphs=False)
    engine.add_request("ROMEO:", SamplingParams(max_tokens=8, temperature=0))
    engine.add_request("JULIET:", SamplingParams(max_tokens=8, temperature=0.8, top_k=5, seed=1, logprobs=2))
    engine.step()                                           # the prefill
    entered: set[str] = set()
    root = str(PACKAGE)

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(root):
            entered.add(Path(frame.f_code.co_filename).relative_to(PACKAGE).as_posix())

    sys.setprofile(profile)
    try:
        deltas = engine.step()                              # every request decodes one token
    finally:
        sys.setprofile(None)
    assert len(deltas) == 2 and all(len(d.new_token_ids) == 1 for d in deltas)
    return entered


def test_every_file_a_decode_step_enters_is_in_the_step_walk():
    entered = traced_decode_step_files()
    assert {"engine/llm_engine.py", "models/transformer.py", "sampling/sampler.py"} <= entered
    missing = sorted(entered - listed_files())
    assert not missing, f"a decode step enters files docs/architecture.md's step walk omits: {missing}"
