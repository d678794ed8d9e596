"""`kd eval`: deterministic masked-LM scoring, agreement and KL against a teacher."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from offline_kd.cli.kd import main as kd
from offline_kd.publish.evaluate import EvalConfig, evaluate, masked_eval_batches


@pytest.fixture(scope="module")
def other_model(tmp_path_factory, tiny_teacher):
    """Same vocabulary, different weights: a second model to compare against the teacher."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    out = tmp_path_factory.mktemp("other")
    model = AutoModelForMaskedLM.from_pretrained(tiny_teacher)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.bert.encoder.parameters():
            p.add_(0.5 * torch.randn_like(p))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_teacher).save_pretrained(out)
    return out


def manual_metrics(model_dir, cfg: EvalConfig):
    """The same metrics computed the obvious way, batch by batch, for comparison."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForMaskedLM.from_pretrained(model_dir).eval()
    hits = total = 0
    nll = 0.0
    with torch.no_grad():
        for ids, attn, labels in masked_eval_batches(cfg, tok):
            logits = model(input_ids=ids, attention_mask=attn).logits
            for b, i in (labels != -100).nonzero().tolist():
                total += 1
                hits += int(logits[b, i].argmax() == labels[b, i])
                nll -= float(torch.log_softmax(logits[b, i], -1)[labels[b, i]])
    return hits / total, math.exp(nll / total), total


def test_masking_is_deterministic_and_15_percent(tiny_teacher, tiny_corpus):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    cfg = EvalConfig(model=str(tiny_teacher), corpus=[str(tiny_corpus)], max_length=32, seed=3)
    a = list(masked_eval_batches(cfg, tok))
    b = list(masked_eval_batches(cfg, tok))
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[2], y[2]) for x, y in zip(a, b, strict=True))
    c = list(masked_eval_batches(EvalConfig(**{**cfg.__dict__, "seed": 4}), tok))
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, c, strict=True))
    labelled = sum(int((lab != -100).sum()) for _, _, lab in a)
    real = sum(int(att.sum()) for _, att, _ in a)
    assert 0.10 < labelled / real < 0.20  # 15% of the non-special tokens


def test_metrics_match_a_direct_computation(tiny_teacher, tiny_corpus, other_model):
    cfg = EvalConfig(model=str(other_model), corpus=[str(tiny_corpus)], max_length=32, batch_size=5)
    result = evaluate(cfg)
    acc, ppl, total = manual_metrics(other_model, cfg)
    assert result.masked_tokens == total
    assert result.accuracy == pytest.approx(acc)
    assert result.masked_perplexity == pytest.approx(ppl, rel=1e-5)
    assert result.accuracy <= result.top5_accuracy <= 1.0
    assert result.teacher_agreement is None and result.kl_teacher_student is None


def test_teacher_agreement_and_kl(tiny_teacher, tiny_corpus, other_model):
    same = evaluate(
        EvalConfig(
            model=str(tiny_teacher), corpus=[str(tiny_corpus)], teacher=str(tiny_teacher), max_length=32
        )
    )
    assert same.teacher_agreement == 1.0
    assert same.kl_teacher_student == pytest.approx(0.0, abs=1e-5)
    other = evaluate(
        EvalConfig(
            model=str(other_model), corpus=[str(tiny_corpus)], teacher=str(tiny_teacher), max_length=32
        )
    )
    assert other.teacher_agreement < 1.0
    assert other.kl_teacher_student > 0.01


def test_cli_json_and_refusals(tiny_teacher, tiny_corpus, tmp_path):
    runner = CliRunner()
    res = runner.invoke(
        kd,
        ["eval", "--model", str(tiny_teacher), "--corpus", str(tiny_corpus), "--max-length", "32", "--json"],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert {"accuracy", "top5_accuracy", "masked_perplexity", "masked_tokens"} <= data.keys()
    assert data["pseudo_perplexity"] == data["masked_perplexity"]  # the former key, kept one version

    table = runner.invoke(
        kd, ["eval", "--model", str(tiny_teacher), "--corpus", str(tiny_corpus), "--max-length", "32"]
    )
    assert table.exit_code == 0 and "masked acc" in table.output

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    res = runner.invoke(kd, ["eval", "--model", str(tiny_teacher), "--corpus", str(empty)])
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error: ")]
    assert res.exit_code == 2 and len(errors) == 1 and "empty" in errors[0]
