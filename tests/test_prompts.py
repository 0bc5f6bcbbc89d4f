"""Prompts from lists, class token spans with the real CLIP tokenizer, Cat-Cross."""

import pytest
import torch

from iseg.prompts import (
    VOC_BACKGROUND,
    PromptTooLongError,
    build_prompt,
    cat_cross,
    check_class_names,
    class_token_spans,
    make_prompt,
)


def test_build_prompt_matches_the_reference_template():
    text = build_prompt(["cat", "dog"])
    assert text == ("a photograph of cat and dog and other object and background, "
                    "ground, land, grass, tree, building, wall, sky, lake, water")
    assert build_prompt(["cat"], background_words=()) == "a photograph of cat and other object and background"
    assert build_prompt(["circle", "star"], prefix="a", extra=(), background_words=(), joiner=" and a ") == "a circle and a star"
    assert len(VOC_BACKGROUND) == 9  # no word lost to a string-continuation slip


@pytest.mark.parametrize("names", [["fire hydrant"], ["potted plant", "tv monitor"], ["dining table", "cat", "fire hydrant"]])
def test_spans_equal_the_tokenizers_own_split(tokenizer, names):
    text = build_prompt(names)
    ids, spans = class_token_spans(tokenizer, text, names)
    assert ids == tokenizer(text)["input_ids"]
    for name, span in zip(names, spans):
        expected = tokenizer(name, add_special_tokens=False)["input_ids"]
        assert [ids[i] for i in span] == expected
        assert list(span) == list(range(span[0], span[0] + len(expected)))


def test_fire_hydrant_is_three_tokens_and_shifts_later_classes(tokenizer):
    names = ["fire hydrant", "cat"]
    prompt = make_prompt(tokenizer, build_prompt(names), names)
    # "a photograph of" = positions 1..3, then fire(4) hydr(5) ant(6), "and"(7), cat(8)
    assert prompt.spans == ((4, 5, 6), (8,))
    assert len(prompt.input_ids) == 77


def test_a_name_inside_a_later_name_is_not_confused(tokenizer):
    names = ["plant", "potted plant"]
    prompt = make_prompt(tokenizer, build_prompt(names), names)
    assert prompt.spans == ((4,), (6, 7))


def test_overflow_names_the_classes_outside_the_window(tokenizer):
    names = [f"class{i} thing" for i in range(30)]
    with pytest.raises(PromptTooLongError) as err:
        make_prompt(tokenizer, build_prompt(names), names)
    message = str(err.value)
    assert "class29 thing" in message and "class0 thing" not in message
    assert "fewer classes" in message


@pytest.mark.parametrize(
    "classes, error, match",
    [([], ValueError, "empty"), (["cat", ""], ValueError, "empty class name"), (["cat", "Cat"], ValueError, "duplicate"),
     ("cat", TypeError, "list of names"), ([3], TypeError, "strings")],
)
def test_bad_class_lists(classes, error, match):
    with pytest.raises(error, match=match):
        check_class_names(classes)


def test_cat_cross_scales_only_class_rows():
    e = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)
    out = cat_cross(e, [(1,), (3, 4)], 1.6)
    assert torch.allclose(out[:, [1, 3, 4]], e[:, [1, 3, 4]] * 1.6)
    assert torch.equal(out[:, [0, 2, 5]], e[:, [0, 2, 5]])
    assert torch.equal(cat_cross(e, [(1,)], 1.0), e)
    assert out.data_ptr() != e.data_ptr()


def test_a_prompt_checks_its_class_names_once(tokenizer, monkeypatch):
    """``class_prompt`` (what ``ISeg.prompt_for`` calls) checks the names once, then builds the text,
    the offsets and the token spans from the checked names; the public pieces still check theirs."""
    import iseg.prompts as P

    calls = []
    real = P.check_class_names
    monkeypatch.setattr(P, "check_class_names", lambda classes: calls.append(list(classes)) or real(classes))
    names = ["cat", "fire hydrant"]
    prompt = P.class_prompt(tokenizer, ["cat", "  fire   hydrant "])
    assert calls == [["cat", "  fire   hydrant "]]
    text = build_prompt(names)
    assert prompt == make_prompt(tokenizer, text, names, P.class_offsets(names))
    with pytest.raises(ValueError, match="duplicate class name"):
        P.class_prompt(tokenizer, ["cat", "Cat"])
    with pytest.raises(TypeError, match="not one string"):
        build_prompt("cat")
