"""The lm-evaluation-harness adapter: its three requests against direct computations, and a local task file run
end to end (from Python and from `memlayers lm-eval`)."""

import json
import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the task's data is a local file: never ask the Hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("lm_eval")

import torch  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from memlayers.cli import main  # noqa: E402
from memlayers.data import build_dataset  # noqa: E402
from memlayers.evaluate import probe_scores  # noqa: E402
from memlayers.integrations.lmeval import MemlayersLM, evaluate_tasks  # noqa: E402
from memlayers.train import load_config, train  # noqa: E402

L = 16


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    overrides = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", f"model.max_seq_len={L}",
                 "data.facts.people=8", "data.facts.choices=4", "data.facts.formats=records", "train.steps=30",
                 "train.batch_size=4", f"train.seq_len={L}", "train.eval_every=0", "train.progress=false"]  # fmt: skip
    cfg = load_config(None, overrides)
    train(cfg, out, evaluate=False)
    return out, build_dataset(cfg.data)


def requests(kind: str, *args) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_loglikelihood_is_the_probes_log_likelihood_and_greedy_recall(run):
    out, data = run
    lm = MemlayersLM(str(out))
    probes = data.probes("records")[:20]
    text = data.tokenizer.decode
    results = lm.loglikelihood(requests("loglikelihood", *[(text(p.prompt[1:]), " " + text(p.answer)) for p in probes]))
    hits, nll = probe_scores(lm.model, probes)
    assert [greedy for _, greedy in results] == hits.tolist()
    assert torch.allclose(torch.tensor([logp for logp, _ in results]), -nll, rtol=1e-5, atol=1e-5)


def test_long_contexts_are_cut_from_the_left_and_rolling_windows_cover_every_token(run):
    out, data = run
    lm = MemlayersLM(str(out))
    words = data.tokenizer.decode(data.documents[0][1:-1]).split()
    long_context = " ".join(words * 6)  # longer than max_seq_len
    ((logp, _),) = lm.loglikelihood(requests("loglikelihood", (long_context, " " + words[0])))
    ids = lm._encode(long_context + " " + words[0])[-L - 1 :]
    x = torch.tensor([ids])
    direct = lm.model(x[:, :-1]).logits.log_softmax(-1)[0, -1, ids[-1]].item()
    assert logp == pytest.approx(direct, abs=1e-5)

    short = " ".join(words[:5])
    (rolling,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", short))
    ids = [data.tokenizer.bos_id] + lm._encode(short)
    x = torch.tensor([ids])
    expected = lm.model(x[:, :-1]).logits.log_softmax(-1)[0].gather(-1, x[0, 1:, None]).sum().item()
    assert rolling == pytest.approx(expected, abs=1e-4)
    (rolling_long,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", long_context))
    assert rolling_long < rolling < 0  # more tokens, each predicted once


class BosAsEos:
    """The run's tokenizer with bos as its end token (which the model never predicts), so that generation runs its
    whole length (the run's own eos decoded as a word)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.eos_id = tokenizer, tokenizer.bos_id

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def decode(self, ids) -> str:  # the special ids too, which the tokenizer drops
        return " ".join(self.tokenizer.decode([i]) or f"<{i}>" for i in ids)


def lm_generating_text(out, **kwargs) -> MemlayersLM:
    """The run's model with its weights randomised (the same each call: the briefly trained model says eos
    after anything), generating past its eos."""
    lm = MemlayersLM(str(out), **kwargs)
    lm.tokenizer = BosAsEos(lm.tokenizer)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lm.model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return lm


def test_generate_until_decodes_greedily_and_stops_at_the_stop_string(run):
    out, data = run
    lm = lm_generating_text(out)
    probe = data.probes("records")[0]
    context = data.tokenizer.decode(probe.prompt[1:])
    (free,) = lm.generate_until(requests("generate_until", (context, {"max_gen_toks": 4})))
    x = torch.tensor([probe.prompt])
    new = lm.model.generate(x, 4, eos_id=lm.tokenizer.eos_id)[0, x.shape[1] :].tolist()
    assert len(free.split()) == 4 and free == lm.tokenizer.decode(new)
    stop = free.split()[1]
    (cut,) = lm.generate_until(requests("generate_until", (context, {"max_gen_toks": 4, "until": [stop]})))
    assert cut == free[: free.find(stop)] and stop not in cut


def test_generation_in_batches_is_generation_one_request_at_a_time(run):
    out, data = run
    text = data.tokenizer.decode
    contexts = [text(p.prompt[1:]) for p in data.probes("records")[:10]] + [text(data.documents[0][1:3])]
    args = [(c, {"max_gen_toks": 3 + i % 2, "until": ["\n"]}) for i, c in enumerate(contexts)]
    batched = lm_generating_text(out, batch_size="auto").generate_until(requests("generate_until", *args))
    single = lm_generating_text(out, batch_size=1)
    assert batched == [single.generate_until(requests("generate_until", a))[0] for a in args]
    assert [len(text.split()) for text in batched] == [3 + i % 2 for i in range(len(args))]  # in request order
    assert len(set(batched)) > 2  # different texts: a mixed-up order would show
    assert MemlayersLM(str(out), batch_size="auto:4").batch_size == 16
    assert MemlayersLM(str(out), batch_size="auto", max_batch_size=4).batch_size == 4
    with pytest.raises(ValueError, match="batch_size must be a whole number >= 1 or 'auto', got 'fast'"):
        MemlayersLM(str(out), batch_size="fast")


def write_task(folder, data) -> None:
    text = data.tokenizer.decode
    rows = [{"prompt": text(p.prompt[1:]), "answer": text(p.answer)} for p in data.probes("records")[:12]]
    (folder / "facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "facts_recall.yaml").write_text(
        "task: facts_recall\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'facts.jsonl'}\n"
        "test_split: test\n"
        "output_type: loglikelihood\n"
        'doc_to_text: "{{prompt}}"\n'
        'doc_to_target: " {{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )


def test_a_local_task_runs_end_to_end(run, tmp_path, capsys):
    out, data = run
    write_task(tmp_path, data)
    results = evaluate_tasks(str(out), ["facts_recall"], include_path=str(tmp_path))
    hits, _ = probe_scores(MemlayersLM(str(out)).model, data.probes("records")[:12])
    assert results["results"]["facts_recall"]["acc,none"] == pytest.approx(hits.float().mean().item())

    assert main(["lm-eval", str(out), "--tasks", "facts_recall", "--include-path", str(tmp_path),
                 "--json", str(tmp_path / "m.json")]) == 0  # fmt: skip
    assert "facts_recall" in capsys.readouterr().out
    assert "acc,none" in json.loads((tmp_path / "m.json").read_text())["facts_recall"]


def test_an_unknown_task_is_one_line(run, tmp_path, capsys, monkeypatch):
    import lm_eval.tasks

    class NoTasks:  # indexing lm-eval's own thousands of task files takes tens of seconds: not needed here
        all_tasks = []

        def __init__(self, *args, **kwargs):
            pass

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", NoTasks)
    assert main(["lm-eval", str(run[0]), "--tasks", "no_such_task", "--include-path", str(tmp_path)]) == 2
    assert "unknown task(s) 'no_such_task'" in capsys.readouterr().err


def test_a_word_outside_a_facts_vocabulary_is_one_clear_error(run):
    lm = MemlayersLM(str(run[0]))
    with pytest.raises(ValueError, match="'zebra' is not in the vocabulary"):
        lm.loglikelihood(requests("loglikelihood", ("zebra", " crossing")))
