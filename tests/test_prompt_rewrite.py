"""The placeholder-level rewrite a pruning decision makes (plain Python, no engine)."""

import random

import pytest

from asymvlm_vllm.core.prompt_rewrite import PlaceholderSpan, pruned_identifier, rewrite_prompt

IMG, BOI, EOI = 9, 7, 8


def test_one_image_keeps_its_rows_in_order_and_moves_nothing_else():
    prompt = [1, 2] + [IMG] * 6 + [3, 4]
    out = rewrite_prompt(prompt, [PlaceholderSpan(2, 6)], {0: [1, 4]})
    assert out.prompt_token_ids == [1, 2, IMG, IMG, 3, 4]
    assert out.spans == [PlaceholderSpan(2, 2)]
    assert out.kept_positions == [0, 1, 3, 6, 8, 9]
    assert out.num_removed == 4


def test_structure_inside_a_span_is_always_kept():
    # Gemma 3: BOI and EOI sit inside the placeholder range with is_embed False.
    prompt = [1, BOI, IMG, IMG, IMG, EOI, 2]
    span = PlaceholderSpan(1, 5, (False, True, True, True, False))
    out = rewrite_prompt(prompt, [span], {0: [2]})
    assert out.prompt_token_ids == [1, BOI, IMG, EOI, 2]
    assert out.spans == [PlaceholderSpan(1, 3, (False, True, False))]


def test_two_images_and_an_image_at_offset_zero():
    prompt = [IMG] * 4 + [1] + [IMG] * 4 + [2]
    out = rewrite_prompt(prompt, [PlaceholderSpan(0, 4), PlaceholderSpan(5, 4)], {0: [0], 1: [1, 3]})
    assert out.prompt_token_ids == [IMG, 1, IMG, IMG, 2]
    assert out.spans == [PlaceholderSpan(0, 1), PlaceholderSpan(2, 2)]


def test_an_image_left_out_of_keep_rows_is_unchanged():
    prompt = [IMG] * 3 + [1] + [IMG] * 3
    out = rewrite_prompt(prompt, [PlaceholderSpan(0, 3), PlaceholderSpan(4, 3)], {1: [0]})
    assert out.prompt_token_ids == [IMG] * 3 + [1, IMG]
    assert out.spans == [PlaceholderSpan(0, 3), PlaceholderSpan(4, 1)]


@pytest.mark.parametrize("keep, message", [
    ([2, 1], "ascending"), ([0, 0], "ascending"), ([5], r"\[0, 4\)"), ([], "every placeholder"),
])
def test_bad_keep_rows_are_refused(keep, message):
    with pytest.raises(ValueError, match=message):
        rewrite_prompt([IMG] * 4, [PlaceholderSpan(0, 4)], {0: keep})


def test_overlapping_spans_and_unknown_images_are_refused():
    with pytest.raises(ValueError, match="overlaps"):
        rewrite_prompt([IMG] * 6, [PlaceholderSpan(0, 4), PlaceholderSpan(2, 3)], {})
    with pytest.raises(ValueError, match="overlaps"):  # the shared position is an image row of both
        rewrite_prompt([IMG] * 5, [PlaceholderSpan(0, 3, (False, True, True)), PlaceholderSpan(2, 3)], {})


def test_spans_may_share_a_structure_token():
    # Gemma 3 spells an image "\n\n<boi> rows <eoi>\n\n"; between two adjacent images the
    # newlines merge into one token (NL4) that vLLM puts in both spans as a non-row position.
    NL, NL4, BOI, EOI = 7, 8, 9, 10
    prompt = [NL, BOI, IMG, IMG, EOI, NL4, BOI, IMG, IMG, EOI, NL]
    row_pattern = (False, False, True, True, False, False)
    spans = [PlaceholderSpan(0, 6, row_pattern), PlaceholderSpan(5, 6, row_pattern)]
    out = rewrite_prompt(prompt, spans, {0: [1], 1: [0]})
    assert out.prompt_token_ids == [NL, BOI, IMG, EOI, NL4, BOI, IMG, EOI, NL]
    pruned_pattern = (False, False, True, False, False)
    assert out.spans == [PlaceholderSpan(0, 5, pruned_pattern), PlaceholderSpan(4, 5, pruned_pattern)]
    assert out.kept_positions == [0, 1, 3, 4, 5, 6, 7, 9, 10]


def test_random_rewrites_remove_exactly_the_dropped_rows():
    rng = random.Random(0)
    for _ in range(300):
        prompt, spans, keep = [], [], {}
        for image in range(rng.randint(1, 3)):
            prompt += [1] * rng.randint(0, 3)
            length = rng.randint(1, 12)
            is_embed = tuple(rng.random() > 0.2 for _ in range(length)) if rng.random() < 0.5 else None
            span = PlaceholderSpan(len(prompt), length, is_embed)
            prompt += [IMG] * length
            spans.append(span)
            if span.num_rows and rng.random() < 0.8:
                keep[image] = sorted(rng.sample(range(span.num_rows), rng.randint(1, span.num_rows)))
        prompt += [2] * rng.randint(0, 3)
        out = rewrite_prompt(prompt, spans, keep)
        removed = sum(spans[i].num_rows - len(rows) for i, rows in keep.items())
        assert len(out.prompt_token_ids) == len(prompt) - removed
        assert [prompt[p] for p in out.kept_positions] == out.prompt_token_ids
        for i, (old, new) in enumerate(zip(spans, out.spans)):
            assert new.num_rows == (len(keep[i]) if i in keep else old.num_rows)
            assert out.prompt_token_ids[new.offset:new.offset + new.length].count(IMG) == new.length


def test_pruned_identifiers_differ_by_keep_set_and_agree_on_equal_ones():
    a = pruned_identifier("img", [0, 2], 4)
    assert a == pruned_identifier("img", [0, 2], 4)
    assert a != pruned_identifier("img", [0, 3], 4)
    assert a != pruned_identifier("other", [0, 2], 4)
    assert a.startswith("img#asymvlm2of4-")


def test_drop_ranges_remove_text_and_move_the_spans():
    out = rewrite_prompt(list(range(20)), [PlaceholderSpan(10, 4)], {0: [1, 3]}, [(2, 5), (15, 17)])
    assert out.prompt_token_ids == [0, 1, 5, 6, 7, 8, 9, 11, 13, 14, 17, 18, 19]
    assert out.kept_positions == out.prompt_token_ids
    assert out.spans == [PlaceholderSpan(7, 2)]
    only_text = rewrite_prompt(list(range(8)), [PlaceholderSpan(0, 2)], {}, [(3, 6)])
    assert only_text.prompt_token_ids == [0, 1, 2, 6, 7] and only_text.spans == [PlaceholderSpan(0, 2)]


@pytest.mark.parametrize("drop, message", [((9, 11), "overlaps image 0"), ((5, 5), "empty"), ((18, 21), "outside")])
def test_bad_drop_ranges_are_refused(drop, message):
    with pytest.raises(ValueError, match=message):
        rewrite_prompt(list(range(20)), [PlaceholderSpan(10, 4)], {}, [drop])
