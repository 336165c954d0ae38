"""`asymvlm calibrate`: the objective table on a tiny LLaVA, Methods A and B, ANLS, and the CLI."""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from asymvlm_vllm.cli import main
from asymvlm_vllm.core import (
    AsymVLMConfig,
    LinearBudget,
    ScorerMetadata,
    ThresholdBudget,
    UniformBudget,
    load_scorer,
    num_tokens_to_keep,
    save_scorer,
)
from asymvlm_vllm.hf.calibration import (
    DEFAULT_RATIO_GRID,
    CalibrationTable,
    anls,
    evaluate_budgets,
    exact_match,
    fit_linear,
    fit_threshold,
    measure_table,
    parse_ratio_grid,
    threshold_candidates,
)
from asymvlm_vllm.hf.fidelity import hidden_state_discrepancy

from .conftest import random_image, sizes_for

FAMILY = "llava"  # 64 prunable vision tokens per image
ARCHITECTURE = "LlavaForConditionalGeneration"
RATIOS = (0.25, 0.5, 0.75, 1.0)
TARGET = 0.5
BATCH = 4
QUESTIONS = ["What is written in the top left corner?", "Which colour is the largest rectangle?",
             "How many shapes are there?", "What is the total amount on the invoice?"]


def _average_keep(rule, gaps, num_tokens):
    """Independent of the code under test: the rule's count per sample, averaged."""
    return float(np.mean([num_tokens_to_keep(int(n), rule.keep_ratio(g)) / n for g, n in zip(gaps, num_tokens)]))


@pytest.fixture(scope="module")
def samples():
    return [(random_image(i), QUESTIONS[i % len(QUESTIONS)], ("unused",)) for i in range(8)]


@pytest.fixture(scope="module")
def vlm(tiny_vlm):
    return tiny_vlm(FAMILY)


@pytest.fixture(scope="module")
def fidelity_table(vlm, samples):
    return measure_table(vlm, samples, RATIOS, "fidelity", batch_size=BATCH)


def test_the_table_holds_the_gaps_and_discrepancies_the_model_gives(vlm, samples, fidelity_table):
    table = fidelity_table
    images, questions, _ = zip(*samples[:BATCH])
    inputs = vlm.process(list(images), list(questions))
    decisions = [d[0].decision for d in vlm.prune(inputs, UniformBudget(1.0)).images]
    assert table.gaps[:BATCH] == pytest.approx([d.gap for d in decisions], abs=1e-7)
    assert table.num_tokens.tolist() == [64] * len(samples)
    assert np.all(table.gaps > 0)
    keep_all, half = table.column(1.0), table.column(0.5)
    assert np.all(table.values[:, keep_all] == 0.0)
    assert np.all(table.values[:, table.column(0.25)] > 0)
    expected = hidden_state_discrepancy(vlm, inputs, UniformBudget(0.5)).numpy()
    np.testing.assert_allclose(table.values[:BATCH, half], expected, rtol=1e-4, atol=1e-7)
    print(f"\nfidelity table, mean discrepancy per ratio {dict(zip(RATIOS, table.values.mean(0).round(4)))}, "
          f"gaps {table.gaps.min():.4f}..{table.gaps.max():.4f}")


def test_method_a_meets_the_target_and_beats_every_uniform_ratio(vlm, samples, fidelity_table):
    table = fidelity_table
    fit = fit_threshold(table, TARGET)
    rule = fit.rule
    assert isinstance(rule, ThresholdBudget)
    ThresholdBudget(**{k: v for k, v in dataclasses.asdict(rule).items() if k != "rule"})  # validates again
    assert {rule.ratio_conservative, rule.ratio_moderate, rule.ratio_aggressive} <= set(RATIOS)
    assert rule.gap_low < rule.gap_high
    average = _average_keep(rule, table.gaps, table.num_tokens)
    assert fit.average_keep == pytest.approx(average, abs=1e-12) and average <= TARGET
    ratios = [rule.keep_ratio(g) for g in table.gaps]
    lookup = np.mean([table.values[s, RATIOS.index(r)] for s, r in enumerate(ratios)])
    assert fit.objective == pytest.approx(lookup, abs=1e-12)
    # Uniform rules are the grid's equal-ratio case: the best one within the target is no better.
    uniform = [table.values[:, i].mean() for i, r in enumerate(RATIOS)
               if _average_keep(UniformBudget(r), table.gaps, table.num_tokens) <= TARGET]
    assert fit.objective <= min(uniform) + 1e-12
    # The lookup is what the model gives when run with the rule.
    measured = evaluate_budgets(vlm, samples, [rule], "fidelity", batch_size=BATCH)
    np.testing.assert_array_equal(measured.kept[:, 0], [num_tokens_to_keep(64, r) / 64 for r in ratios])
    np.testing.assert_allclose(measured.values[:, 0], [table.values[s, RATIOS.index(r)] for s, r in enumerate(ratios)],
                               rtol=1e-4, atol=1e-7)
    print(f"\nmethod A: {rule}, average keep {fit.average_keep:.4f}, discrepancy {fit.objective:.4f} "
          f"(best uniform within target {min(uniform):.4f})")


def _synthetic_table(objective: str, num_samples: int = 40, seed: int = 0) -> CalibrationTable:
    """Images with a large gap lose little when pruned (the premise of AsymVLM)."""
    rs = np.random.RandomState(seed)
    ratios = np.array([0.15, 0.3, 0.5, 0.75, 1.0])
    gaps = rs.gamma(2.0, 0.03, num_samples)
    harm = np.outer(0.01 / gaps, 1.0 - ratios) * rs.uniform(0.8, 1.2, (num_samples, 1))
    values = harm if objective == "fidelity" else 1.0 - np.minimum(harm, 1.0)
    return CalibrationTable(objective, ratios, gaps, rs.choice([64, 576], num_samples), values)


@pytest.mark.parametrize("objective", ["fidelity", "anls"])
@pytest.mark.parametrize("target", [0.3, 0.5])
def test_method_a_finds_the_best_rule_of_the_grid(objective, target):
    table = _synthetic_table(objective)
    fit = fit_threshold(table, target)
    sign = 1.0 if objective == "anls" else -1.0
    best = -np.inf
    for low, high in threshold_candidates(table.gaps):
        for aggressive, moderate, conservative in itertools.combinations_with_replacement(table.ratios, 3):
            rule = ThresholdBudget(gap_low=low, gap_high=high, ratio_conservative=conservative,
                                   ratio_moderate=moderate, ratio_aggressive=aggressive)
            if _average_keep(rule, table.gaps, table.num_tokens) <= target:
                columns = [list(table.ratios).index(rule.keep_ratio(g)) for g in table.gaps]
                best = max(best, sign * table.values[np.arange(len(columns)), columns].mean())
    assert sign * fit.objective == pytest.approx(best, abs=1e-12)
    assert _average_keep(fit.rule, table.gaps, table.num_tokens) <= target
    uniform = max(sign * table.values[:, i].mean() for i, r in enumerate(table.ratios)
                  if _average_keep(UniformBudget(r), table.gaps, table.num_tokens) <= target)
    assert sign * fit.objective > uniform + 1e-3  # the gap is informative here, so tiers must help
    assert fit.rule.ratio_conservative > fit.rule.ratio_aggressive
    assert fit_threshold(table, target).rule == fit.rule  # deterministic


@pytest.mark.parametrize("target", [0.5, 0.4])
def test_method_b_hits_the_target_on_the_model(vlm, samples, fidelity_table, target):
    table = fidelity_table
    fit = fit_linear(table, target, min_ratio=0.25, tolerance=0.01)
    rule = fit.rule
    assert isinstance(rule, LinearBudget) and rule.slope <= 0
    assert rule.gap_mean == pytest.approx(table.gaps.mean(), abs=1e-12)
    average = _average_keep(rule, table.gaps, table.num_tokens)
    assert fit.average_keep == pytest.approx(average, abs=1e-12)
    assert target - 0.01 <= average <= target
    steep = fit_linear(table, target, min_ratio=0.25, slopes_per_std=(0.3,))
    assert steep.rule.slope < 0
    assert target - 0.01 <= _average_keep(steep.rule, table.gaps, table.num_tokens) <= target
    measured = evaluate_budgets(vlm, samples, [steep.rule], "fidelity", batch_size=BATCH)
    assert measured.kept[:, 0].mean() == pytest.approx(steep.average_keep, abs=1e-12)
    print(f"\nmethod B, target {target}: {rule} average {average:.4f}; "
          f"steep {steep.rule.slope:.3g}: average {steep.average_keep:.4f}, "
          f"discrepancy estimated {steep.objective:.4f}, measured {measured.values.mean():.4f}")


def test_method_b_shifts_the_intercept_when_the_clamp_bites():
    table = _synthetic_table("fidelity", num_samples=200)
    fit = fit_linear(table, 0.3, min_ratio=0.15, max_ratio=1.0, slopes_per_std=(0.3,))
    rule = fit.rule
    ratios = [rule.keep_ratio(g) for g in table.gaps]
    assert min(ratios) == 0.15 and max(ratios) > 0.5  # both sides of the clamp are used
    assert rule.target_ratio != 0.3  # a skewed distribution clamps unevenly; the intercept compensates
    assert 0.29 <= _average_keep(rule, table.gaps, table.num_tokens) <= 0.3
    with pytest.raises(ValueError, match="must lie within the clamp"):
        fit_linear(table, 0.1, min_ratio=0.15)
    with pytest.raises(ValueError, match="below the smallest ratio of the grid"):
        fit_linear(table, 0.3, min_ratio=0.1)


def test_anls():
    assert anls("Hello World", ["hello   world "]) == 1.0
    assert anls("hello worle", ["hello world"]) == pytest.approx(1 - 1 / 11)
    assert anls("abc", ["xyz"]) == 0.0
    assert anls("ab", ["ac"]) == 0.0  # NL = 0.5 is not below the threshold
    assert anls("abcd", ["abce"]) == pytest.approx(0.75)
    assert anls("", ["answer"]) == 0.0 and anls("", [""]) == 1.0
    assert anls("1 200", ["12,00", "1 200"]) == 1.0  # the best reference counts
    assert exact_match(" Total  Amount", ["total amount"]) == 1.0
    assert exact_match("total amounts", ["total amount"]) == 0.0


def test_anls_objective_scores_the_greedy_answers(vlm, samples):
    images, questions, _ = zip(*samples[:BATCH])
    reference = vlm.generate(vlm.process(list(images), list(questions)), max_new_tokens=3, budget=UniformBudget(1.0))
    texts = [vlm.processor.tokenizer.decode(t, skip_special_tokens=True).strip() for t in reference.tokens]
    labelled = [(img, q, (texts[i],) if i < 2 else ("zzzz qqqq",)) for i, (img, q) in enumerate(zip(images, questions))]
    result = evaluate_budgets(vlm, labelled, [UniformBudget(0.25), UniformBudget(1.0)], "anls",
                              max_new_tokens=3, batch_size=BATCH)
    assert result.predictions[1] == texts
    assert result.values[:2, 1].tolist() == [1.0, 1.0]
    for column in range(2):
        assert result.values[:, column].tolist() == [anls(p, s[2]) for p, s in zip(result.predictions[column], labelled)]
    table = CalibrationTable("anls", np.array([0.25, 1.0]), result.gaps, result.num_tokens, result.values)
    fit = fit_threshold(table, 0.7)
    assert fit.average_keep <= 0.7
    assert fit.objective >= table.values[:, 0].mean()  # uniform 0.25 is the only uniform within 0.7
    print(f"\nANLS keep-all {result.values[:, 1].mean():.3f}, at 0.25 {result.values[:, 0].mean():.3f}; "
          f"method A: {fit.rule}, average {fit.average_keep:.4f}, ANLS {fit.objective:.3f}")


def _write_data(folder, count):
    lines = []
    for i in range(count):
        random_image(i).save(folder / f"img{i}.png")
        lines.append(json.dumps({"image": f"img{i}.png", "question": QUESTIONS[i % len(QUESTIONS)], "answer": f"a{i}"}))
    data = folder / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return data


def test_cli_writes_the_rule_into_the_scorer_a_yaml_and_a_histogram(tiny_model_dirs, tmp_path, capsys):
    data = _write_data(tmp_path, 6)
    scorer = save_scorer(tmp_path / "w.safetensors", torch.ones(128), ScorerMetadata(architecture=ARCHITECTURE, hidden_size=128))
    config, histogram = tmp_path / "out" / "llava.yaml", tmp_path / "gaps.png"
    argv = ["calibrate", "--model", str(tiny_model_dirs(FAMILY)), "--data", str(data), "--scorer", str(scorer),
            "--objective", "fidelity", "--target-keep-ratio", "0.5", "--ratio-grid", "0.25,0.5,0.75",
            "--batch-size", "6", "-o", str(config), "--histogram", str(histogram)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "calibrated threshold" in out and "keep-all (uniform 1.0)" in out and "(ratio = the calibrated average)" in out

    written = load_scorer(scorer)
    assert torch.equal(written.weight, torch.ones(128))
    rule = written.metadata.calibrated_budget
    assert isinstance(rule, ThresholdBudget)
    loaded = AsymVLMConfig.load(config)
    assert loaded.calibrated and loaded.architectures == [ARCHITECTURE]
    assert loaded.vision.budget == rule and loaded.vision.ranker == "learned"
    assert loaded.vision.scorer.resolve() == scorer.resolve()
    assert main(["config", "check", str(config)]) == 0
    assert "not calibrated" not in capsys.readouterr().err

    assert histogram.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(histogram) as png:
        png.verify()
        assert png.format == "PNG" and png.size[0] > 100


def test_cli_method_b_measures_an_off_grid_rule_and_warns_of_a_flat_objective(tiny_model_dirs, tmp_path, capsys):
    data = _write_data(tmp_path, 4)
    config = tmp_path / "linear.yaml"
    argv = ["calibrate", "--model", str(tiny_model_dirs(FAMILY)), "--data", str(data), "--method", "linear",
            "--objective", "exact", "--max-new-tokens", "2", "--target-keep-ratio", "0.4", "--ratio-grid", "0.25,0.5",
            "-o", str(config)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    loaded = AsymVLMConfig.load(config)
    rule = loaded.vision.budget
    assert isinstance(rule, LinearBudget) and loaded.vision.ranker == "cosine"
    assert loaded.calibrated and loaded.vision.scorer is None
    # The random model never says "a0": exact match is 0 everywhere, ties go to the uniform slope.
    assert "every sample scores 0 at every ratio" in captured.err
    assert rule.slope == 0.0 and rule.target_ratio == 0.4 and rule.min_ratio == 0.25
    row = next(line for line in captured.out.splitlines() if line.startswith("calibrated linear"))
    assert float(row.split()[-2]) == pytest.approx(25 / 64, abs=1e-4)  # floor(64 * 0.4) tokens of 64, measured by running the rule


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--target-keep-ratio", "0"], "--target-keep-ratio must be in (0, 1], got 0"),
        (["--target-keep-ratio", "1.5"], "--target-keep-ratio must be in (0, 1], got 1.5"),
        (["--target-keep-ratio", "nan"], "--target-keep-ratio must be in (0, 1], got nan"),
        (["--target-keep-ratio", "0.5", "--samples", "0"], "--samples must be at least 1, got 0"),
        (["--target-keep-ratio", "0.5", "--ratio-grid", "0.5,abc"], "comma-separated keep ratios, got 'abc'"),
        (["--target-keep-ratio", "0.5", "--ratio-grid", "0,0.5"], "keep ratios in (0, 1], got 0"),
        (["--target-keep-ratio", "0.1"], "below the smallest --ratio-grid value 0.15"),
        (["--target-keep-ratio", "0.5", "--method", "linear", "--min-ratio", "0.6"],
         "must lie within [--min-ratio, --max-ratio] = [0.6, 1]"),
    ],
)
def test_cli_refuses_out_of_range_values(tmp_path, capsys, extra, message):
    assert main(["calibrate", "--model", str(tmp_path), "--data", str(tmp_path / "none.jsonl"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_cli_default_grid_is_the_library_default():
    from asymvlm_vllm.commands import calibrate as command

    assert parse_ratio_grid(command.DEFAULT_RATIO_GRID) == DEFAULT_RATIO_GRID
    assert parse_ratio_grid(" 1, 0.5,0.5 ") == (0.5, 1.0)


def test_cli_refuses_bad_data_and_scorers(tiny_model_dirs, tmp_path, capsys):
    base = ["calibrate", "--model", str(tiny_model_dirs(FAMILY)), "--target-keep-ratio", "0.5"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main([*base, "--data", str(empty)]) == 2
    assert f"{empty} holds no samples" in capsys.readouterr().err
    assert main([*base, "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "data not found" in capsys.readouterr().err
    data = _write_data(tmp_path, 2)
    other = save_scorer(tmp_path / "g.safetensors", torch.ones(128),
                        ScorerMetadata(architecture="Gemma3ForConditionalGeneration", hidden_size=128))
    assert main([*base, "--data", str(data), "--scorer", str(other)]) == 2
    assert "was trained for Gemma3ForConditionalGeneration, but the model is LlavaForConditionalGeneration" in capsys.readouterr().err


def test_phi3v_batches_measure_what_single_samples_do(tiny_vlm):
    """Phi-3.5-Vision's processor takes one prompt at a time; its adapter collates a batch of a
    wide and a tall image (457 and 469 image rows, both 288 + 144 prunable) with left padding.
    The table of a batch is the table of its samples run one by one."""
    vlm = tiny_vlm("phi3_v")
    samples = [(random_image(20 + i, *size), QUESTIONS[i], ("unused",)) for i, size in enumerate(sizes_for("phi3_v", [0, 0]))]
    batched = measure_table(vlm, samples, (0.25, 1.0), "fidelity", batch_size=2)
    alone = [measure_table(vlm, [s], (0.25, 1.0), "fidelity", batch_size=1) for s in samples]
    assert batched.num_tokens.tolist() == [432, 432]
    assert batched.gaps.tolist() == pytest.approx([t.gaps[0] for t in alone], abs=1e-6)
    assert np.all(batched.values[:, batched.column(1.0)] == 0.0) and np.all(batched.values[:, batched.column(0.25)] > 0)
    np.testing.assert_allclose(batched.values, np.concatenate([t.values for t in alone]), rtol=1e-3, atol=1e-7)
    answers = evaluate_budgets(vlm, samples, [UniformBudget(0.25)], "anls", max_new_tokens=3, batch_size=2)
    single = [evaluate_budgets(vlm, [s], [UniformBudget(0.25)], "anls", max_new_tokens=3, batch_size=1) for s in samples]
    assert answers.predictions[0] == [r.predictions[0][0] for r in single]
    assert answers.kept[:, 0].tolist() == [num_tokens_to_keep(432, 0.25) / 432] * 2
