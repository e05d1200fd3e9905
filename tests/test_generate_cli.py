"""`memlayers generate` end to end: tiny facts and text runs trained in a tmp dir, then the command's output
(greedy = Transformer.generate, seeded sampling reproducible, eos) and its one-line errors."""

import pytest
import torch

from memlayers import cli
from memlayers.data import FactsDataset, build_tokenizer
from memlayers.train import load_checkpoint, load_config, train

TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=16", "train.steps=4",
        "train.batch_size=4", "train.seq_len=16", "train.warmup=1", "train.eval_every=0", "train.threads=1",
        "train.progress=false"]  # fmt: skip
FACTS = ["data.facts.people=8", "data.facts.choices=4", "data.facts.formats=records"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: extra threads only cost


@pytest.fixture(scope="module")
def facts_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("facts")
    train(load_config(None, TINY + FACTS + ["train.steps=40", "train.lr=1e-2"]), out, evaluate=False)  # ~1 s
    return out


def generate(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(["generate", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def prompt_words(run) -> str:
    """A record prefix of the run's first person: "First Last birth_city"."""
    cfg, _, _ = load_checkpoint(run)
    return FactsDataset(cfg.data.facts).people[0].name + " birth_city"


def test_greedy_prints_what_the_model_generates(facts_run, capsys):
    prompt = prompt_words(facts_run)
    code, out, err = generate(capsys, facts_run, prompt, "--max-new-tokens", 5, "--no-stop-at-eos")
    assert code == 0 and not err
    cfg, model, _ = load_checkpoint(facts_run)
    tok = build_tokenizer(cfg.data)
    ids = torch.tensor([[tok.bos_id] + tok.encode(prompt)])
    expected = model.generate(ids, 5)[0, ids.shape[1] :].tolist()
    assert out == tok.decode(expected) + "\n"


def test_stop_at_eos_cuts_the_continuation(facts_run, capsys):
    prompt = prompt_words(facts_run)
    cfg, model, _ = load_checkpoint(facts_run)
    tok = build_tokenizer(cfg.data)
    ids = torch.tensor([[tok.bos_id] + tok.encode(prompt)])
    new = model.generate(ids, 12, eos_id=tok.eos_id)[0, ids.shape[1] :].tolist()
    assert tok.eos_id in new[1:]  # the trained run ends its records
    cut = new[: new.index(tok.eos_id)]
    assert generate(capsys, facts_run / "checkpoint.pt", prompt, "--max-new-tokens", 12) == (
        0, tok.decode(cut) + "\n", "")  # fmt: skip


def test_seeded_sampling_is_reproducible(facts_run, capsys):
    argv = [facts_run, "", "--max-new-tokens", 16, "--temperature", 1.5, "--top-k", 20, "--top-p", 0.95,
            "--no-stop-at-eos"]  # fmt: skip
    runs = [generate(capsys, *argv, "--seed", seed) for seed in (1, 1, 2)]
    assert all(code == 0 for code, _, _ in runs)
    assert runs[0][1] == runs[1][1] and len(runs[0][1].split()) >= 8  # ~16 words (bos/eos/pad ids are dropped)
    assert runs[0][1] != runs[2][1]


def test_text_run_uses_bytes_without_reading_the_corpus(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"{i}.txt").write_text(f"hello world {i}, the quick brown fox. " * 20)
    out = tmp_path / "run"
    overrides = ["data.kind=text", f"data.text.paths=[{corpus}]", "data.text.val_fraction=0.34"]
    train(load_config(None, TINY + overrides), out, evaluate=False)
    for f in corpus.iterdir():
        f.unlink()  # generation must not need the corpus
    code, printed, err = generate(capsys, out, "hello", "--max-new-tokens", 8, "--no-stop-at-eos")
    assert code == 0 and not err and 1 <= len(printed.encode()) <= 8 * 3 + 1  # <= 8 bytes (each maybe U+FFFD)


def test_unknown_word_is_named(facts_run, capsys):
    first = prompt_words(facts_run).split()[0]
    code, out, err = generate(capsys, facts_run, f"{first} zzunknown birth_city")
    assert code == 2 and not out and err.count("\n") == 1
    assert err.startswith("memlayers generate: error: the prompt word 'zzunknown' is not in the vocabulary of this "
                          "run's facts corpus")  # fmt: skip


@pytest.mark.parametrize(
    "argv, message",
    [(["--device", "cuda"], "CUDA is not available"),
     (["--device", "banana"], "'banana' is not a torch device"),
     (["--top-p", "1.5"], "top_p must be in (0, 1]")],
)  # fmt: skip
def test_errors_are_one_line(facts_run, capsys, argv, message):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, out, err = generate(capsys, facts_run, "", *argv)
    assert code == 2 and not out
    assert err.startswith("memlayers generate: error: ") and message in err and err.count("\n") == 1


def test_missing_checkpoint(tmp_path, capsys):
    code, out, err = generate(capsys, tmp_path / "nowhere", "hi")
    assert code == 2 and err.startswith("memlayers generate: error: no checkpoint at") and err.count("\n") == 1
